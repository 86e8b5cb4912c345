"""PairRecord: JSON and row forms round-trip exactly; bad values are refused with the fix."""

from __future__ import annotations

import dataclasses
import json

import pytest

from shadow.records import ROW_COLUMNS, SCHEMA_VERSION, Answer, PairRecord


def make_record(i: int = 0, **overrides) -> PairRecord:
    fields = dict(  # noqa: C408 - reads like the constructor call
        pair_id=f"chatcmpl-{i:05d}",
        request_id=f"req-{i}",
        route="default",
        variant="student-a",
        target="teacher",
        request={"messages": [{"role": "user", "content": f"question {i} — é ✓"}],
                 "temperature": 0.7, "max_tokens": 64, "stream": True},
        student=Answer("smollm2-135m", "v3", f"answer {i}", "stop", 12, 5, 41.5, 120.25),
        teacher=Answer("qwen2.5-coder-0.5b", None, f"teacher answer {i}", "length", 14, 64,
                       None, 2003.0),
        created_at=f"2026-11-28T21:{i // 60 % 60:02d}:{i % 60:02d}.000000+00:00",
        teacher_logprobs=[{"token": "Paris", "logprob": -0.105,
                           "top": [["Paris", -0.105], ["paris", -2.5]]}],
        scores={"exact_match": 0.0, "semantic": None, "disagreement": 0.1 * (i % 10)},
    )
    fields.update(overrides)
    return PairRecord(**fields)


def test_json_round_trip_is_exact():
    r = make_record(7)
    text = r.to_json()
    assert "\n" not in text
    back = PairRecord.from_json(text)
    assert back == r
    assert back.to_json() == text
    assert back.schema_version == SCHEMA_VERSION


def test_row_round_trip_and_columns():
    r = make_record(3)
    row = r.to_row()
    assert tuple(row) == ROW_COLUMNS
    assert row["student_version"] == "v3"
    assert row["teacher"] == "qwen2.5-coder-0.5b"
    assert row["disagreement"] == pytest.approx(0.3)
    assert PairRecord.from_row(row) == r


def test_unscored_record_without_logprobs():
    r = make_record(1, scores={}, teacher_logprobs=None)
    assert r.disagreement is None
    assert r.to_row()["disagreement"] is None
    assert PairRecord.from_json(r.to_json()) == r
    scored = r.with_scores({"disagreement": 0.25})
    assert scored.disagreement == 0.25 and r.scores == {}


def test_float_values_survive_json_exactly():
    odd = 0.1 + 0.2
    r = make_record(2, scores={"disagreement": odd, "rouge_l": 1e-17})
    assert PairRecord.from_json(r.to_json()).scores["disagreement"] == odd


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_numbers_are_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="clamp"):
        make_record(teacher_logprobs=[{"token": "a", "logprob": bad, "top": [["a", bad]]}])
    with pytest.raises(ValueError, match="clamp"):
        make_record(scores={"disagreement": bad})


def test_empty_ids_are_refused():
    with pytest.raises(ValueError, match="pair_id"):
        make_record(pair_id="")


def test_newer_schema_and_unknown_fields_are_refused():
    data = make_record().to_dict()
    with pytest.raises(ValueError, match="upgrade protege"):
        PairRecord.from_dict({**data, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ValueError, match="unknown fields"):
        PairRecord.from_dict({**data, "surprise": 1})
    student = {**data["student"], "extra": 1}
    with pytest.raises(ValueError, match="unknown fields"):
        PairRecord.from_dict({**data, "student": student})


def test_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_record().route = "other"  # type: ignore[misc]


def test_json_is_plain_json():
    data = json.loads(make_record(5).to_json())
    assert data["student"]["ttft_ms"] == 41.5
    assert data["teacher"]["ttft_ms"] is None
    assert data["teacher_logprobs"][0]["top"][1] == ["paris", -2.5]


# --- responses, feedback and the spill line --------------------------------------------------------


def test_spill_line_round_trips_pairs_and_responses():
    from shadow.records import ResponseRecord, from_spill_line, spill_line

    response = ResponseRecord("chatcmpl-1", "default", "student-a", "v3",
                              "2026-11-28T21:00:00.000000+00:00")
    pair = make_record(3)
    assert from_spill_line(spill_line(response)) == response
    assert from_spill_line(spill_line(pair)) == pair
    assert "\n" not in spill_line(response)
    with pytest.raises(ValueError, match="unknown fields"):
        from_spill_line(spill_line(response)[:-1] + ',"extra":1}')


def test_feedback_needs_one_value_and_finite_numbers():
    from shadow.records import FeedbackRecord, ResponseRecord

    response = ResponseRecord("r", "default", "a", "1", "2026-11-28T21:00:00+00:00")
    FeedbackRecord("f", response, "thumbs_up", 1.0, None, "t")
    FeedbackRecord("f", response, "comment", None, "great", "t")
    for value, comment in ((None, None), (1.0, "both")):
        with pytest.raises(ValueError, match="exactly one"):
            FeedbackRecord("f", response, "m", value, comment, "t")
    with pytest.raises(ValueError, match="JSON cannot store"):
        FeedbackRecord("f", response, "m", float("nan"), None, "t")
    with pytest.raises(ValueError, match="non-empty"):
        ResponseRecord("", "default", "a", "1", "t")


def test_to_dict_is_the_whole_record_as_asdict_gives_it():
    record = make_record(teacher_logprobs=[{"token": "Hi", "logprob": -0.1,
                                            "top": [["Hi", -0.1], ["Hey", -2.5]]}])
    assert record.to_dict() == dataclasses.asdict(record)
    assert PairRecord.from_json(record.to_json()) == record
