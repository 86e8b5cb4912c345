"""`shadow report` and `dataset export`: the pure pieces, and the commands on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from ops.cli import app
from shadow.export import FeedbackFilter, content_key, select, split_of, to_example
from shadow.labels import Label, StudentBetter, latest
from shadow.records import Answer, FeedbackRecord, ResponseRecord
from shadow.report import percentile, render, summarize
from shadow.store import SqliteStore
from tests.unit.test_records import make_record


def pair(i, *, route="default", version="v3", d=0.5, prompt=None, teacher_text="t", **kw):
    content = prompt if prompt is not None else f"question {i}"
    return make_record(
        i, route=route, scores={"disagreement": d},
        request={"messages": [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": content}], "params": {}},
        student=Answer("student", version, f"s{i}", "stop", 3, 2, 10.0 + i, 100.0 + i),
        teacher=Answer("teacher", None, teacher_text, "stop", 3, 4, 50.0, 500.0 + i), **kw)


def feedback(response_id, metric, value, *, variant="student-a", route="default", comment=None):
    r = ResponseRecord(response_id, route, variant, "v3", "2026-11-28T21:00:00+00:00")
    return FeedbackRecord(f"fb-{response_id}-{metric}-{value}", r, metric, value, comment,
                          "2026-11-28T21:00:01+00:00")


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 90) == 90.0
    assert percentile(values, 100) == 100.0 and percentile(values, 0) == 1.0


def test_summary_groups_routes_and_versions_and_keeps_the_worst():
    pairs = [pair(i, d=i / 10) for i in range(10)]
    pairs += [pair(20, route="other", version="v4", d=0.2), make_record(21, scores={})]
    fb = [feedback("a", "thumbs_up", 1.0), feedback("b", "thumbs_up", 0.0),
          feedback("c", "thumbs_up", 1.0, variant="student-b"),
          feedback("d", "note", None, comment="meh")]
    s = summarize(pairs, fb, worst=3)
    assert s["pairs"] == 12 and s["scored"] == 11
    default = next(r for r in s["routes"] if r["route"] == "default" and r["student_version"]
                   == "v3")
    assert default["pairs"] == 11 and default["scored"] == 10  # the unscored pair counts too
    assert default["disagreement"]["mean"] == pytest.approx(0.45)
    assert default["disagreement"]["p90"] == pytest.approx(0.8)
    # 100..109 and the unscored pair's 120.25: the 6th of 11
    assert default["student_latency_ms"]["p50"] == pytest.approx(105.0)
    assert [w["pair_id"] for w in s["worst"]] == [pairs[9].pair_id, pairs[8].pair_id,
                                                  pairs[7].pair_id]
    assert s["worst"][0]["prompt"] == "question 9" and s["worst"][0]["teacher"] == "t"
    rows = {(r["variant"], r["metric"]): r for r in s["feedback"]}
    assert rows[("student-a", "thumbs_up")]["count"] == 2
    assert rows[("student-a", "thumbs_up")]["mean"] == 0.5
    assert rows[("student-b", "thumbs_up")]["mean"] == 1.0
    assert rows[("student-a", "note")]["comments"] == 1 and rows[("student-a", "note")][
        "mean"] is None
    assert summarize([], [], worst=0) == {"pairs": 0, "scored": 0, "routes": [], "worst": [],
                                          "feedback": []}


def test_the_report_shows_structured_pairs_per_route():
    def structured(i, valid):
        return make_record(i, scores={"disagreement": 0.3, "student_format_valid": valid,
                                      "teacher_format_valid": 1.0, "field_agreement": 0.5,
                                      "field_agreement_normalized": 1.0},
                           request={"messages": [{"role": "user", "content": "q"}],
                                    "params": {}})

    s = summarize([structured(1, 1.0), structured(2, 0.0), pair(3)], [])
    route = s["routes"][0]["structured"]
    assert route["pairs"] == 2 and route["student_format_valid"] == 0.5
    assert route["teacher_format_valid"] == 1.0 and route["field_agreement"] == 0.5
    from rich.console import Console

    console = Console(record=True, width=200)
    for table in render(s):
        console.print(table)
    assert "Structured outputs" in console.export_text()
    assert summarize([pair(1)], [])["routes"][0]["structured"]["pairs"] == 0


def test_example_is_the_prompt_plus_the_teacher_answer():
    e = to_example(pair(1, teacher_text="Paris."))
    assert e["messages"] == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "question 1"},
                             {"role": "assistant", "content": "Paris."}]
    assert e["teacher_logprobs"][0]["token"] == "Paris" and e["disagreement"] == 0.5
    completion = make_record(2, request={"prompt": "Once upon", "params": {}})
    assert to_example(completion)["messages"][0] == {"role": "user", "content": "Once upon"}
    assert to_example(pair(3, teacher_text="  ")) is None  # nothing to learn
    assert e["response_format"] is None
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object"}}}
    structured = make_record(5, request={"messages": [{"role": "user", "content": "q"}],
                                         "params": {"response_format": fmt}})
    assert json.loads(to_example(structured)["response_format"]) == fmt
    assert to_example(make_record(4, request={"params": {}})) is None  # prompt not stored


def test_split_is_stable_and_near_the_share():
    keys = [content_key([{"role": "user", "content": f"q{i}"}]) for i in range(2000)]
    splits = [split_of(k, 0.1) for k in keys]
    assert 0.07 < splits.count("validation") / len(keys) < 0.13
    assert splits == [split_of(k, 0.1) for k in keys]
    # Growing the share only moves train examples into validation, never back.
    wider = [split_of(k, 0.2) for k in keys]
    assert all(w == "validation" for s, w in zip(splits, wider, strict=True)
               if s == "validation")
    assert {split_of(k, 0.0) for k in keys} == {"train"}


def test_select_dedupes_by_prompt_and_filters_by_feedback():
    pairs = [pair(0, prompt="same"), pair(1, prompt="same"), pair(2), pair(3)]
    out = list(select(pairs, [], [], 0.5))
    assert [e["id"] for e in out] == [pairs[0].pair_id, pairs[2].pair_id, pairs[3].pair_id]
    fb = [feedback(pairs[2].pair_id, "thumbs_up", 1.0),
          feedback(pairs[3].pair_id, "thumbs_up", 0.0)]
    keep = [FeedbackFilter.parse("thumbs_up=true")]
    assert [e["id"] for e in select(pairs, fb, keep, 0.5)] == [pairs[2].pair_id]
    drop = [FeedbackFilter.parse("thumbs_up != false")]
    assert [e["id"] for e in select(pairs, fb, drop, 0.5)] == [pairs[0].pair_id,
                                                                 pairs[2].pair_id]
    for bad in ("thumbs_up", "thumbs_up=maybe", "=1"):
        with pytest.raises(ValueError, match="thumbs_up|METRIC|value"):
            FeedbackFilter.parse(bad)


@pytest.fixture
def store_config(tmp_path):
    config = yaml.safe_load(Path("examples/fake.yaml").read_text())
    config["shadow"] = {"store_path": str(tmp_path / "pairs.sqlite"),
                        "spill_dir": str(tmp_path / "spill")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    store = SqliteStore(tmp_path / "pairs.sqlite")
    pairs = [pair(i, d=i / 20) for i in range(20)] + [pair(30, route="other")]
    store.write_batch(pairs)
    for f in (feedback(pairs[1].pair_id, "thumbs_up", 1.0),
              feedback(pairs[2].pair_id, "thumbs_up", 0.0)):
        store.add_feedback(f)
    return path, pairs


def test_report_command_prints_tables_and_json(store_config):
    path, pairs = store_config
    runner = CliRunner()
    result = runner.invoke(app, ["shadow", "report", "--config", str(path), "--worst", "2"])
    assert result.exit_code == 0, result.output
    assert "Shadow pairs: 21 (21 scored)" in result.output and "Worst pairs" in result.output
    assert "Latency p50" in result.output
    assert "Feedback by arm" in result.output
    result = runner.invoke(app, ["shadow", "report", "--config", str(path), "--json",
                                 "--route", "default"])
    data = json.loads(result.output)
    assert data["pairs"] == 20 and data["worst"][0]["pair_id"] == pairs[19].pair_id
    result = runner.invoke(app, ["shadow", "report", "--config", str(path), "--since", "soon"])
    assert result.exit_code == 2 and "ISO 8601" in result.output


def test_export_command_writes_both_formats(store_config, tmp_path):
    path, pairs = store_config
    runner = CliRunner()
    out = tmp_path / "ds"
    result = runner.invoke(app, ["dataset", "export", "--config", str(path), "--out", str(out),
                                 "--route", "default", "--min-disagreement", "0.5",
                                 "--validation-share", "0.3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for split in ("train", "validation")
            for line in (out / f"{split}.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(p.pair_id for p in pairs[10:20])
    assert f"exported {sum(r['split'] == 'train' for r in rows)} train" in result.output
    assert all(r["messages"][-1] == {"role": "assistant", "content": "t"} for r in rows)

    result = runner.invoke(app, ["dataset", "export", "--config", str(path), "--out", str(out),
                                 "--format", "parquet", "--feedback", "thumbs_up=true"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "train.parquet").to_pylist() + pq.read_table(
        out / "validation.parquet").to_pylist()
    assert [r["id"] for r in table] == [pairs[1].pair_id]
    assert table[0]["messages"][1] == {"role": "user", "content": "question 1"}
    assert json.loads(table[0]["teacher_logprobs"])[0]["token"] == "Paris"

    bad = runner.invoke(app, ["dataset", "export", "--config", str(path), "--out", str(out),
                              "--feedback", "thumbs_up"])
    assert bad.exit_code == 2 and "METRIC=VALUE" in bad.output
    bad = runner.invoke(app, ["dataset", "export", "--config", str(path), "--out", str(out),
                              "--format", "csv"])
    assert bad.exit_code == 2


# --- labels in the export ---------------------------------------------------------------------------


def label(pair_id, verdict, corrected=None, at="2026-11-29T10:00:00.000000+00:00"):
    return Label(f"lbl-{pair_id}-{at}", pair_id, verdict, corrected, "ana", at)


def test_a_label_decides_the_target():
    p = pair(1, teacher_text="teacher says")
    target = lambda e: e and e["messages"][-1]["content"]  # noqa: E731
    assert target(to_example(p, label(p.pair_id, "teacher"))) == "teacher says"
    assert target(to_example(p, label(p.pair_id, "both_fine"))) == "teacher says"
    fixed = to_example(p, label(p.pair_id, "both_wrong", "the right answer"))
    assert target(fixed) == "the right answer" and fixed["target"] == "corrected"
    assert fixed["teacher_logprobs"] is None  # they belong to the teacher's answer
    assert fixed["label"] == "both_wrong"
    assert to_example(p, label(p.pair_id, "both_wrong")) is None
    better = label(p.pair_id, "student")
    assert to_example(p, better) is None  # dropped by default
    assert target(to_example(p, better, StudentBetter.keep)) == "teacher says"
    as_student = to_example(p, better, StudentBetter.student)
    assert target(as_student) == "s1" and as_student["target"] == "student"
    unfinished = pair(2, teacher_text="")
    assert to_example(unfinished) is None
    assert target(to_example(unfinished, label(unfinished.pair_id, "teacher", "fixed"))) == "fixed"


def test_reviewed_pairs_speak_for_their_prompt():
    pairs = [pair(0, prompt="same", teacher_text="first"),
             pair(1, prompt="same", teacher_text="second"),
             pair(2, prompt="dropped"), pair(3, prompt="dropped"), pair(4)]
    labels = latest([label(pairs[1].pair_id, "teacher", "old fix", at="2026-11-29T09"),
                     label(pairs[1].pair_id, "teacher", "new fix", at="2026-11-29T10"),
                     label(pairs[3].pair_id, "both_wrong")])
    out = list(select(pairs, [], [], 0.0, labels))
    assert [(e["id"], e["messages"][-1]["content"]) for e in out] == [
        (pairs[1].pair_id, "new fix"), (pairs[4].pair_id, "t")]
    assert [e["id"] for e in select(pairs, [], [], 0.0, labels, labelled_only=True)] == [
        pairs[1].pair_id]


def test_export_command_uses_labels(store_config, tmp_path):
    path, pairs = store_config
    store = SqliteStore(tmp_path / "pairs.sqlite")
    for p, verdict, fix in ((pairs[11], "teacher", "corrected eleven"), (pairs[12], "student", None),
                            (pairs[13], "both_wrong", None), (pairs[14], "both_fine", None)):
        assert store.add_label(label(p.pair_id, verdict, fix))
    runner = CliRunner()
    out = tmp_path / "ds"

    def export(*args):
        result = runner.invoke(app, ["dataset", "export", "--config", str(path), "--out",
                                     str(out), "--route", "default", *args])
        assert result.exit_code == 0, result.output
        return {r["id"]: r for split in ("train", "validation")
                for r in map(json.loads, (out / f"{split}.jsonl").read_text().splitlines())}

    rows = export()
    assert rows[pairs[11].pair_id]["messages"][-1]["content"] == "corrected eleven"
    assert pairs[12].pair_id not in rows and pairs[13].pair_id not in rows
    assert rows[pairs[14].pair_id]["label"] == "both_fine"
    assert rows[pairs[15].pair_id]["label"] is None and len(rows) == 18
    rows = export("--student-better", "student", "--labelled-only")
    assert sorted(rows) == sorted(p.pair_id for p in (pairs[11], pairs[12], pairs[14]))
    assert rows[pairs[12].pair_id]["messages"][-1]["content"] == "s12"
    bad = runner.invoke(app, ["dataset", "export", "--config", str(path), "--out", str(out),
                              "--student-better", "maybe"])
    assert bad.exit_code == 2
