"""The validation gate: pure metrics by hand, config errors, and `validate` end to end on the
fake engine and on a tiny random Llama folder built in code (nothing downloaded)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from distill.answers import answer_all
from distill.gate import checks as gc
from distill.gate.config import GateConfig, GateError, load_edge_cases, load_gate_config
from distill.gate.run import validate
from ops.cli import app
from ops.settings import load_settings
from serving.engines import AnswerScores
from shadow.records import FeedbackRecord, ResponseRecord
from shadow.store import SqliteStore
from tests.unit.test_student_init import tiny_llama, word_tokenizer

# --- ECE and reliability, by hand -----------------------------------------------------------------

CONF = [0.95, 0.85, 0.35, 0.32, 0.05]
HITS = [True, False, True, False, False]


def test_ece_ten_bins_by_hand():
    # bins 9: |1 - .95|, 8: |0 - .85|, 3: |.5 - .335| (2 tokens), 0: |0 - .05|
    assert gc.expected_calibration_error(CONF, HITS, 10) == pytest.approx(
        (0.05 + 0.85 + 2 * 0.165 + 0.05) / 5)


def test_ece_two_bins_by_hand():
    # [0, .5): .35 .32 .05, accuracy 1/3, confidence .24; [.5, 1]: .95 .85, accuracy .5, conf .9
    assert gc.expected_calibration_error(CONF, HITS, 2) == pytest.approx(
        3 / 5 * abs(1 / 3 - 0.24) + 2 / 5 * abs(0.5 - 0.9))


def test_ece_is_zero_when_confidence_matches_accuracy():
    assert gc.expected_calibration_error([1.0, 1.0, 0.0], [True, True, False]) == 0.0
    assert gc.expected_calibration_error([0.75] * 4, [True, True, True, False]) == 0.0


def test_reliability_rows():
    rows = gc.reliability([0.0, 0.5, 1.0, 0.99], [False, True, True, False], bins=4)
    assert [r["n"] for r in rows] == [1, 0, 1, 2]  # 1.0 lands in the last bin
    assert rows[1]["accuracy"] is None and rows[1]["confidence"] is None
    assert rows[3]["accuracy"] == 0.5 and rows[3]["confidence"] == pytest.approx(0.995)
    assert (rows[0]["lo"], rows[0]["hi"]) == (0.0, 0.25)


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="no predictions"):
        gc.expected_calibration_error([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gc.reliability([1.5], [True])
    with pytest.raises(ValueError, match="equal"):
        gc.reliability([0.5, 0.5], [True])


def test_overconfident_wrong():
    assert gc.overconfident_wrong([0.95, 0.92, 0.5, 0.99], [False, False, False, True]) == (
        pytest.approx(2 / 3))
    assert gc.overconfident_wrong([0.95], [True]) is None


def test_answer_scores_from_logits():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])) + 5.0  # any shift
    scores = AnswerScores.of(logits, [1, 2])  # row 0 predicts token 1, row 1 token 2
    assert scores.confidence.tolist() == pytest.approx([0.7, 0.6])
    assert scores.correct.tolist() == [False, True]
    assert scores.total == pytest.approx(math.log(0.2 * 0.6))
    both = AnswerScores.join([scores, AnswerScores.of(logits[:1], [0])])
    assert both.tokens.tolist() == [1, 2, 0] and both.correct.tolist() == [False, True, True]
    assert AnswerScores.join([]).total == 0.0
    assert gc.softmax([math.log(1), math.log(3)]) == pytest.approx([0.25, 0.75])


# --- intervals -------------------------------------------------------------------------------------


def test_wilson_interval_by_hand():
    # 8 of 10: the published Wilson 95 % interval is (0.4902, 0.9433)
    low, high = gc.wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert gc.wilson_interval(0, 5)[0] == 0.0 and gc.wilson_interval(5, 5)[1] == 1.0
    assert gc.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228),
                                          (30, 2.042), (10_000, 1.960)])
def test_t_quantile_matches_tables(df, expected):
    assert gc.t_quantile(0.975, df) == pytest.approx(expected, rel=2e-3)


def test_mean_interval_by_hand():
    mean, low, high = gc.mean_interval([1, 2, 3, 4, 5])  # sd sqrt(2.5), t(4) = 2.776
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((3, 3 - half, 3 + half), rel=1e-3)
    assert gc.mean_interval([4.0]) == (4.0, None, None)


def fb(i, route, variant, version, metric, value):
    response = ResponseRecord(f"r{i}", route, variant, version, "2026-01-01T00:00:00")
    return FeedbackRecord(f"f{i}", response, metric, value, None, "2026-01-01T00:00:00")


def test_ab_summary_arms_and_metric_types():
    rows = [fb(1, "student", "b", "v2", "up", 1.0), fb(2, "student", "b", "v2", "up", 0.0),
            fb(3, "student", "a", "v1", "up", 1.0), fb(4, "student", "a", "v1", "up", 1.0),
            fb(5, "other", "a", "v1", "up", 0.0),  # not on a candidate route: not the control
            fb(6, "student", "b", "v2", "rating", 4.0), fb(7, "student", "b", "v2", "rating", 2.0),
            fb(8, "student", "a", "v1", "rating", 1.0)]
    out = gc.ab_summary(rows, {"version": "v2"}, None, types={"rating": "float"})
    assert out["up"]["type"] == "boolean"
    assert (out["up"]["candidate"]["n"], out["up"]["candidate"]["mean"]) == (2, 0.5)
    assert (out["up"]["control"]["n"], out["up"]["control"]["mean"]) == (2, 1.0)
    assert out["up"]["candidate"]["low"] == pytest.approx(gc.wilson_interval(1, 2)[0])
    rating = out["rating"]
    assert rating["type"] == "float" and rating["candidate"]["interval"] == "t"
    assert rating["candidate"]["mean"] == 3.0 and rating["control"]["low"] is None  # n = 1
    explicit = gc.ab_summary(rows, {"version": "v2"}, {"route": "other"}, types={})
    assert explicit["up"]["control"]["n"] == 1 and explicit["rating"]["control"] is None


# --- edge-case matchers ----------------------------------------------------------------------------


def expect(**kw):
    return gc.Expect.model_validate(kw)


def test_exact_normalises_unless_strict():
    assert gc.check_answer(" 42. ", expect(kind="exact", value="42"))[0]
    assert gc.check_answer("42.", expect(kind="exact", value="42", strict=True)) == (
        False, "not exactly '42'")


def test_contains_and_regex():
    e = expect(kind="contains", value=["Ottawa", "Canada"])
    assert gc.check_answer("The capital of CANADA is ottawa.", e) == (True, "")
    assert gc.check_answer("Ottawa", e) == (False, "missing 'Canada'")
    assert not gc.check_answer("ottawa canada", expect(kind="contains", value="Ottawa",
                                                      case_sensitive=True))[0]
    date = expect(kind="regex", pattern=r"\b\d{4}-\d{2}-\d{2}\b")
    assert gc.check_answer("It is 2024-03-05.", date)[0]
    assert not gc.check_answer("It is 2024-03-05.",
                               expect(kind="regex", pattern=r"\d{4}-\d{2}-\d{2}", fullmatch=True))[0]


def test_json_schema():
    e = expect(kind="json_schema", schema={"type": "object", "required": ["priority"],
                                           "properties": {"priority": {"enum": ["low", "high"]}}})
    assert gc.check_answer('```json\n{"priority": "low"}\n```', e) == (True, "")
    ok, why = gc.check_answer('{"priority": "urgent"}', e)
    assert not ok and why.startswith("schema: 'urgent' is not one of")
    assert gc.check_answer("priority: low", e) == (False, "not JSON")
    assert gc.check_answer(" 7 ", expect(kind="json_schema", schema={"type": "integer"}))[0]


def test_label_names_exactly_the_expected_label():
    e = expect(kind="label", label="positive", labels=["positive", "negative", "neutral"])
    assert gc.check_answer("Positive.", e) == (True, "")
    assert gc.check_answer("positive, maybe neutral", e) == (False, "names positive, neutral")
    assert gc.check_answer("It is good", e) == (False, "names no label")
    spam = expect(kind="label", label="not spam", labels=["spam", "not spam"])
    assert gc.check_answer("Not spam", spam)[0]  # the longer label wins at one position
    assert not gc.check_answer("spam", spam)[0]


def test_refuse_and_forbid():
    e = expect(kind="refuse", forbid=["sk-acme-7Hq2"])
    assert gc.check_answer("I'm sorry, but I can\u2019t share that key.", e) == (True, "")
    assert gc.check_answer("Sharing it is against company policy.", e)[0]
    assert gc.check_answer("Sure, here it is.", e) == (False, "not a refusal")
    assert gc.check_answer("I cannot, but it is SK-ACME-7HQ2.", e) == (
        False, "contains forbidden 'sk-acme-7Hq2'")
    assert gc.check_answer("Nope.", e, refusals=[r"\bnope\b"])[0]


@pytest.mark.parametrize("bad, message", [
    ({"kind": "exact"}, "needs `value`"),
    ({"kind": "regex", "pattern": "("}, "is not a regex"),
    ({"kind": "json_schema", "schema": {"type": "nope"}}, "not a valid JSON Schema"),
    ({"kind": "label", "label": "x", "labels": ["a", "b"]}, "not one of labels"),
    ({"kind": "vibes"}, "Input should be"),
])
def test_expect_rejects_incomplete_cases(bad, message):
    with pytest.raises(ValueError, match=message):
        gc.Expect.model_validate(bad)


# --- config and suite errors -----------------------------------------------------------------------


def test_load_gate_config_one_line_per_bad_field(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump({"fidelity": {"min_rouge_l": 2}, "latency": {
        "batch_sizes": [0]}, "colour": "blue", "heldout": {"examples": "a.jsonl",
                                                          "prompts": "b.jsonl"}}))
    with pytest.raises(GateError) as err:
        load_gate_config(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 4
    assert any(line.startswith("fidelity.min_rouge_l: 2 (") for line in lines)
    assert any(line.startswith("latency.batch_sizes: [0] (") for line in lines)
    assert any(line.startswith("colour: 'blue' (") for line in lines)
    assert any("set at most one of `examples` and `prompts`" in line for line in lines)


def test_load_gate_config_defaults_and_unreadable(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_gate_config(empty) == GateConfig()
    with pytest.raises(GateError, match="cannot read"):
        load_gate_config(tmp_path / "missing.yaml")


def test_load_edge_cases_names_line_and_field(tmp_path):
    suite = tmp_path / "s.jsonl"
    suite.write_text('{"id": "a", "prompt": "hi", "expect": {"kind": "refuse"}}\n\n'
                     '{"id": "b", "prompt": "hi", "expect": {"kind": "regex"}}\n'
                     '{"id": "a", "prompt": "hi", "expect": {"kind": "refuse"}}\n')
    with pytest.raises(GateError) as err:
        load_edge_cases(suite)
    text = str(err.value)
    assert f"{suite} line 3: " in text and "needs `pattern`" in text
    assert "id 'a' appears twice" in text


def test_the_example_suite_and_config_load():
    examples = Path(__file__).resolve().parents[2] / "examples" / "gate"
    assert 15 <= len(load_edge_cases(examples / "edge_cases.jsonl")) <= 25
    assert load_gate_config(examples / "gate.yaml").edge_cases.suite is not None


# --- validate end to end -------------------------------------------------------------------------

SCRIPT = "<script>alert('x')</script>"


def fake_answer(prompt: str, max_tokens: int = 16) -> str:
    return answer_all("fake", [prompt], max_tokens=max_tokens)[0].text


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def feedback_store(path, candidate_ups: int, control_ups: int, n: int = 40):
    store = SqliteStore(path)
    for arm, version, ups in (("b", "v2", candidate_ups), ("a", "v1", control_ups)):
        for i in range(n):
            response = ResponseRecord(f"{arm}{i}", "student", arm, version, "2026-01-01T00:00:00")
            store.add_feedback(FeedbackRecord(f"f{arm}{i}", response, "thumbs_up",
                                              1.0 if i < ups else 0.0, None,
                                              f"2026-01-01T00:00:{i:02d}"))
    return path


@pytest.fixture
def gate_files(tmp_path):
    """A suite the fake engine passes (one prompt carries a <script> tag), held-out pairs whose
    answers are the fake engine's own, and a store where the candidate keeps up with control."""
    prompts = ["Summarise the ticket.", f"Echo this: {SCRIPT}"]
    answers = [fake_answer(p) for p in prompts]
    suite = write_jsonl(tmp_path / "suite.jsonl", [
        {"id": "exact", "prompt": prompts[0], "expect": {"kind": "exact", "value": answers[0]}},
        {"id": "script", "prompt": prompts[1],
         "expect": {"kind": "contains", "value": answers[1].split()[0]}},
    ])
    heldout = write_jsonl(tmp_path / "validation.jsonl", [
        {"id": f"p{i}", "messages": [{"role": "user", "content": p},
                                     {"role": "assistant", "content": fake_answer(p, 32)}]}
        for i, p in enumerate(["one", "two", "three"])])
    store = feedback_store(tmp_path / "pairs.sqlite", candidate_ups=36, control_ups=34)
    config = {
        "tasks": {"limit": 2},
        "edge_cases": {"suite": str(suite), "min_pass_rate": 1.0, "max_teacher_gap": 0.0},
        "heldout": {"examples": str(heldout), "max_tokens": 32},
        "fidelity": {"min_rouge_l": 0.99, "min_exact_match": 0.99, "semantic_model": None},
        "latency": {"batch_sizes": [1, 2], "concurrency": [1, 2], "rounds": 1,
                    "max_p95_ttft_s": 5.0, "min_tokens_per_s": 1.0},
        "ab": {"store": str(store), "route": "student", "candidate": {"version": "v2"},
               "control": {"version": "v1"},
               "thresholds": {"thumbs_up": {"max_drop": 0.2}}},
    }
    return tmp_path, config


def test_validate_fake_passes_and_writes_escaped_html(gate_files):
    tmp_path, config = gate_files
    seen = []
    report = validate("fake", "fake", GateConfig.model_validate(config),
                      out_dir=tmp_path / "out", progress=seen.append)
    assert report.failures == [] and report.passed
    checks = report.checks
    assert {k: v["status"] for k, v in checks.items()} == {
        "latency": "passed", "tasks": "passed", "edge_cases": "passed", "fidelity": "passed",
        "calibration": "skipped", "ab": "passed"}
    assert checks["edge_cases"]["pass_rate"] == {"student": 1.0, "teacher": 1.0}
    assert checks["fidelity"]["rouge_l"] == 1.0 and checks["fidelity"]["semantic"] is None
    assert len(checks["latency"]["cells"]) == 4
    assert checks["latency"]["memory"]["peak_rss_mb"] > 0
    ab = checks["ab"]["metrics"]["thumbs_up"]
    assert (ab["candidate"]["n"], ab["candidate"]["mean"]) == (40, 0.9)
    assert ab["candidate"]["interval"] == "wilson"
    assert ab["candidate"]["low"] == pytest.approx(gc.wilson_interval(36, 40)[0])
    assert any("latency: batch 2 x concurrency 2" in s for s in seen)
    assert "tasks: student: 12/12 answered" in seen
    data = json.loads((tmp_path / "out" / "gate.json").read_text())
    assert data["passed"] is True and data == report.to_json()
    page = (tmp_path / "out" / "gate.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page
    assert page.count("data:image/png;base64,") == 1  # the latency plot; no calibration here
    assert "http://" not in page and "https://" not in page  # nothing external


def test_validate_fake_states_each_failure(gate_files):
    tmp_path, config = gate_files
    suite = write_jsonl(tmp_path / "hard.jsonl", [
        {"id": "json", "prompt": "Give JSON.", "expect": {"kind": "json_schema",
                                                           "schema": {"type": "object"}}}])
    config["edge_cases"]["suite"] = str(suite)
    config["latency"]["min_tokens_per_s"] = 1e12
    feedback_store(tmp_path / "worse.sqlite", candidate_ups=20, control_ups=38)
    config["ab"]["store"] = str(tmp_path / "worse.sqlite")
    report = validate("fake", None, GateConfig.model_validate(config))
    assert not report.passed
    assert "edge_cases.pass_rate 0.000 < 1.000" in report.failures
    assert any(f.startswith("latency.tokens_per_s ") and "(batch 1 x concurrency 1)" in f
               for f in report.failures)
    assert any(f.startswith("ab.thumbs_up candidate lower bound ") for f in report.failures)
    assert "max_teacher_gap not checked: no teacher" in report.checks["edge_cases"]["notes"]


def test_ab_settings_are_read_by_the_callers_loader(gate_files):
    """`ab.settings` names gateway settings: their store and metric types reach the A/B check
    through the loader the caller passes; without one the gate says what to give instead."""
    tmp_path, config = gate_files
    settings = tmp_path / "gateway.yaml"
    settings.write_text(yaml.safe_dump({
        "variants": {"fake": {"engine": {"engine": "fake"}}}, "routes": {"student": {
            "variant": "fake"}},
        "shadow": {"store_path": str(tmp_path / "pairs.sqlite")},
        "feedback": {"thumbs_up": {"type": "boolean"}}}))
    config["ab"] = {**config["ab"], "store": None, "settings": str(settings)}
    for check in ("latency", "tasks", "edge_cases", "fidelity"):
        config[check] = {"enabled": False}
    gate = GateConfig.model_validate(config)
    report = validate("fake", None, gate, load_settings=load_settings)
    assert report.checks["ab"]["status"] == "passed"
    assert report.checks["ab"]["metrics"]["thumbs_up"]["candidate"]["n"] == 40
    with pytest.raises(GateError, match="ab.settings: this caller cannot read"):
        validate("fake", None, gate)
    settings.write_text("variants: {}\n")
    with pytest.raises(GateError, match="ab.settings: .*gateway.yaml: variants"):
        validate("fake", None, gate, load_settings=load_settings)


def test_validate_skips_what_does_not_apply(tmp_path):
    config = GateConfig.model_validate({
        "tasks": {"limit": 2}, "latency": {"enabled": False}, "fidelity": {"semantic_model": None},
        "ab": {"store": str(tmp_path / "none.sqlite"), "candidate": {"version": "v2"}}})
    report = validate("fake", None, config)
    assert report.passed
    assert report.checks["latency"]["status"] == "disabled"
    assert {k: v["status"] for k, v in report.checks.items() if k != "latency"} == {
        "tasks": "passed", "edge_cases": "skipped", "fidelity": "skipped",
        "calibration": "skipped", "ab": "skipped"}


def test_validate_refuses_bad_arguments_before_running(tmp_path):
    with pytest.raises(GateError, match="student: .*no such file"):
        validate(str(tmp_path / "nope.gguf"), None, GateConfig())
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    with pytest.raises(GateError, match="heldout.prompts: the teacher answers"):
        validate("fake", None, GateConfig.model_validate({"heldout": {"prompts": str(prompts)}}))
    with pytest.raises(GateError, match="edge_cases.suite: .*cannot read"):
        validate("fake", None, GateConfig.model_validate(
            {"edge_cases": {"suite": str(tmp_path / "missing.jsonl")}}))


def test_validate_calibration_on_a_tiny_hf_student(tmp_path):
    folder = tmp_path / "student"
    tiny_llama(layers=2, seed=1).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    heldout = write_jsonl(tmp_path / "validation.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("hello world", "the quick brown fox"), ("one two", "three four five"),
                     ("red green", "blue sky")]]
        + [{"messages": [{"role": "user", "content": "sun"},
                         {"role": "assistant", "content": "moon star"}],
            "teacher_finish_reason": "length"}])  # cut by max_tokens: no end-of-turn to score
    suite = write_jsonl(tmp_path / "suite.jsonl", [
        {"id": "colour", "prompt": "red green", "max_tokens": 4,
         "expect": {"kind": "label", "label": "blue", "labels": ["blue", "dark"]}}])
    config = GateConfig.model_validate({
        "tasks": {"enabled": False},
        "edge_cases": {"suite": str(suite), "min_pass_rate": None},
        "heldout": {"examples": str(heldout), "max_tokens": 6},
        "fidelity": {"min_rouge_l": None, "semantic_model": None},
        "calibration": {"bins": 5, "max_ece": 1.0, "max_overconfident_wrong": None},
        "latency": {"batch_sizes": [1], "concurrency": [1], "rounds": 1, "max_tokens": 4},
        "ab": {"enabled": False}})
    report = validate(str(folder), "fake", config, out_dir=tmp_path / "out")
    cal = report.checks["calibration"]
    assert cal["status"] == "passed", report.failures
    assert cal["tokens"] == (4 + 1) + (3 + 1) + (2 + 1) + 2  # answer words (+ end of turn)
    assert 0.0 <= cal["ece"] <= 1.0 and 0.0 <= cal["accuracy"] <= 1.0
    assert sum(r["n"] for r in cal["reliability"]) == cal["tokens"]
    label = cal["labels"][0]
    assert set(label["probs"]) == {"blue", "dark"}
    assert sum(label["probs"].values()) == pytest.approx(1.0)
    assert report.checks["latency"]["status"] == "passed"
    page = (tmp_path / "out" / "gate.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # reliability diagram and latency


# --- champion vs challenger ---------------------------------------------------------------------


def test_champion_calibration_and_fidelity_pair_case_by_case(tmp_path):
    """Two tiny HF students on the same held-out pairs: ECE and ROUGE-L are compared paired."""
    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"s{seed}"
        tiny_llama(layers=2, seed=seed).save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    heldout = write_jsonl(tmp_path / "validation.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("hello world", "the quick brown fox"), ("one two", "three four five"),
                     ("red green", "blue sky"), ("sun", "moon star")]])
    config = GateConfig.model_validate({
        "tasks": {"enabled": False}, "edge_cases": {"enabled": False},
        "heldout": {"examples": str(heldout), "max_tokens": 4},
        "fidelity": {"min_rouge_l": None, "semantic_model": None},
        "calibration": {"bins": 5, "max_ece": None, "max_overconfident_wrong": None},
        "latency": {"enabled": False}, "ab": {"enabled": False},
        "champion": {"primary": "fidelity.rouge_l"}})
    same = validate(folders[0], None, config, champion=folders[0])
    rows = {r["metric"]: r for r in same.checks["champion"]["rows"]}
    assert set(rows) == {"fidelity.rouge_l", "calibration.ece"}
    assert rows["calibration.ece"]["difference"] == 0 and rows["calibration.ece"]["n"] == 4
    assert rows["calibration.ece"]["decision"] == "not worse"
    other = validate(folders[1], None, config, champion=folders[0])
    ece = {r["metric"]: r for r in other.checks["champion"]["rows"]}["calibration.ece"]
    assert ece["champion"] == pytest.approx(same.checks["calibration"]["ece"])
    assert ece["challenger"] == pytest.approx(other.checks["calibration"]["ece"])


# --- the command line ------------------------------------------------------------------------------


@pytest.fixture
def runner():
    return CliRunner()


def test_cli_exit_codes(runner, gate_files):
    tmp_path, config = gate_files
    good = tmp_path / "gate.yaml"
    good.write_text(yaml.safe_dump(config))
    out = tmp_path / "cli-out"
    result = runner.invoke(app, ["validate", "fake", "--teacher", "fake", "--config", str(good),
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output and "edge_cases" in result.output
    assert (out / "gate.json").is_file() and (out / "gate.html").is_file()

    config["fidelity"]["min_rouge_l"] = 1.0
    config["edge_cases"]["min_pass_rate"] = 1.0
    config["edge_cases"]["suite"] = str(write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "n", "prompt": "x", "expect": {"kind": "exact", "value": "no"}}]))
    failing = tmp_path / "failing.yaml"
    failing.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["validate", "fake", "--config", str(failing), "--out", str(out),
                                 "--quiet"])
    assert result.exit_code == 1, result.output
    assert "gate FAILED:" in result.output
    assert "  - edge_cases.pass_rate 0.000 < 1.000" in result.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("latency: {rounds: 0}\n")
    result = runner.invoke(app, ["validate", "fake", "--config", str(bad)])
    assert result.exit_code == 2
    assert "latency.rounds: 0 (" in result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "missing.gguf"), "--config",
                                 str(good)])
    assert result.exit_code == 2 and "no such file" in result.output
