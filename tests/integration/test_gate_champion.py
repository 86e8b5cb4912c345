"""Champion vs challenger through the gate, scored on a real OpenAI-compatible endpoint
(`tests.oracle`: "oracle" answers every task case right, "dunce" none): the paired table,
refusals with their reasons, configurable margins, and the CLI's --champion."""

import pytest
import yaml
from typer.testing import CliRunner

from distill.gate.config import GateConfig, GateError
from distill.gate.run import validate
from ops.cli import app
from tests.oracle import serve_oracle


@pytest.fixture(scope="module")
def oracle():
    with serve_oracle() as url:
        yield url


def paired_config(**champion) -> GateConfig:
    """The task suite (6 gate cases a family) and latency, paired; nothing else."""
    return GateConfig.model_validate({
        "tasks": {"limit": 6}, "edge_cases": {"enabled": False},
        "fidelity": {"enabled": False}, "calibration": {"enabled": False},
        "latency": {"batch_sizes": [1], "concurrency": [1], "rounds": 3, "max_tokens": 8,
                    "max_p95_ttft_s": None},
        "ab": {"enabled": False}, "champion": champion})


def test_a_better_challenger_passes_with_the_paired_table(oracle, tmp_path):
    report = validate(f"{oracle}#oracle", None, paired_config(), champion=f"{oracle}#dunce",
                      out_dir=tmp_path)
    assert report.passed, report.failures
    champion = report.checks["champion"]
    rows = {r["metric"]: r for r in champion["rows"]}
    assert set(rows) == {"tasks.pass_rate", "latency.p95_ttft_s",
                         *(f"tasks.{f}.pass_rate" for f in
                           ("classify", "extract", "qa", "format", "summarize", "structured"))}
    main = rows["tasks.pass_rate"]
    assert (main["champion"], main["challenger"], main["primary"]) == (0.0, 1.0, True)
    assert main["mcnemar"]["challenger_only"] == 36 and main["mcnemar"]["p_value"] < 1e-8
    assert main["decision"] == "better" and champion["status"] == "passed"
    assert report.checks["tasks"]["pass_rate"]["champion"]["overall"]["passed"] == 0
    page = (tmp_path / "gate.html").read_text()
    assert "tasks.pass_rate (primary)" in page and "McNemar p" in page
    assert "Cases where champion and challenger differ" in page


def test_a_worse_challenger_is_refused_with_the_reason(oracle):
    report = validate(f"{oracle}#dunce", None, paired_config(), champion=f"{oracle}#oracle")
    assert not report.passed
    reason = next(f for f in report.failures if f.startswith("champion: tasks.pass_rate"))
    assert "challenger 0.000 vs champion 1.000" in reason and "below the margin" in reason
    families = [f for f in report.failures if f.startswith("champion: tasks.") and
                ".pass_rate:" in f and not f.startswith("champion: tasks.pass_rate")]
    assert len(families) == 6


def test_no_better_is_not_enough(oracle):
    report = validate(f"{oracle}#oracle", None, paired_config(), champion=f"{oracle}#oracle")
    rows = {r["metric"]: r for r in report.checks["champion"]["rows"]}
    assert rows["tasks.pass_rate"]["decision"] == "not worse"
    assert report.failures == [
        "champion: tasks.pass_rate: gain +0.000 [0.000, 0.000] is not a significant "
        "improvement (McNemar p=1.000)"]


def test_the_primary_metric_and_margins_are_configurable(oracle):
    # A worse task score is let through only when its margin says so; the primary metric
    # must then be measured: latency never improves significantly here.
    config = paired_config(margins={"tasks.pass_rate": 1.0, "tasks.family": 1.0},
                           primary="edge_cases.pass_rate")
    report = validate(f"{oracle}#dunce", None, config, champion=f"{oracle}#oracle")
    assert report.failures == ["champion: champion.primary: edge_cases.pass_rate was not "
                               "measured (is its check enabled?)"]
    with pytest.raises(GateError, match="champion.required: name the version serving now"):
        validate(f"{oracle}#oracle", None, paired_config(required=True))
    with pytest.raises(ValueError, match="margins must be >= 0"):
        paired_config(margins={"fidelity.rouge_l": -0.1})


@pytest.fixture
def runner():
    return CliRunner()


def test_cli_champion_option(runner, oracle, tmp_path):
    config = tmp_path / "paired.yaml"
    config.write_text(yaml.safe_dump(paired_config().model_dump(mode="json")))
    better = runner.invoke(app, ["validate", f"{oracle}#oracle", "--champion", f"{oracle}#dunce",
                                 "--config", str(config), "--out", str(tmp_path / "a"),
                                 "--quiet"])
    assert better.exit_code == 0, better.output
    assert "champion" in better.output and "promote: 8 metrics compared" in better.output
    worse = runner.invoke(app, ["validate", f"{oracle}#dunce", "--champion", f"{oracle}#oracle",
                                "--config", str(config), "--out", str(tmp_path / "b"), "--quiet"])
    assert worse.exit_code == 1 and "  - champion: tasks.pass_rate: challenger 0.000" in worse.output
    config.write_text(yaml.safe_dump({"champion": {"required": True}}))
    missing = runner.invoke(app, ["validate", f"{oracle}#dunce", "--config", str(config)])
    assert missing.exit_code == 2 and "champion.required" in missing.output
