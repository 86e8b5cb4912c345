"""`protege eval` against a real OpenAI-compatible endpoint (`tests.oracle`: "oracle" answers
each task case with its reference, "dunce" with nothing useful), from Python and the CLI."""

import json

import pytest
from typer.testing import CliRunner

from distill.evaluate import DEFAULT_SUITE, evaluate, resolve_model
from distill.tasks import load_suite
from ops.cli import app
from ops.gateway import free_port
from tests.oracle import serve_oracle

FAMILIES = {"classify", "extract", "qa", "format", "summarize", "structured"}


@pytest.fixture(scope="module")
def oracle():
    with serve_oracle() as url:
        yield url


def test_eval_scores_an_endpoint_per_family(oracle):
    cases = load_suite(DEFAULT_SUITE, splits=["gate"], limit=4)
    report = evaluate(oracle, cases, concurrency=4)  # no #MODEL: the first listed, "oracle"
    assert report["model"] == f"{oracle}#oracle"
    assert report["summary"]["overall"] | {"low": 0, "high": 0} == {
        "n": 24, "passed": 24, "rate": 1.0, "low": 0, "high": 0}
    assert [r["answer"] for r in report["rows"]] == [c.reference for c in cases]
    dunce = evaluate(f"{oracle}#dunce", cases)
    assert dunce["summary"]["overall"]["passed"] == 0
    assert set(dunce["summary"]["families"]) == FAMILIES


def test_eval_cli_table_json_and_errors(oracle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", f"{oracle}#oracle", "--limit", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["family", f"{oracle}#oracle"]
    assert {ln.split()[0] for ln in lines[1:7]} == FAMILIES
    assert lines[7].startswith("overall") and "1.000" in lines[7] and "(12/12)" in lines[7]
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", f"{oracle}#dunce", "--split", "dev", "--family", "qa",
                                 "--limit", "3", "--json", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report == json.loads(out.read_text())
    assert report["splits"] == ["dev"] and report["summary"]["overall"]["n"] == 3
    bad = runner.invoke(app, ["eval", f"{oracle}#oracle", "--split", "nope"])
    assert bad.exit_code == 2 and "no case of split nope" in bad.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "none.gguf")])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_resolve_model_explains_an_unreachable_endpoint():
    port = free_port()  # nothing listens there
    with pytest.raises(ValueError, match="cannot list the endpoint's models"):
        resolve_model(f"http://127.0.0.1:{port}/v1", timeout_s=2)
    assert resolve_model("x.gguf") == "x.gguf"
