"""The mirror's pure pieces: timing a teacher's deltas and building the pair record."""

from __future__ import annotations

import itertools

import pytest

from ops.settings import ConfigError, load_settings
from serving.engines.base import (
    Delta,
    GenerationRequest,
    Message,
    SamplingParams,
    TokenLogprob,
)
from serving.engines.structured import choice_of, parse_response_format
from shadow.mirror import MirrorJob, make_record, request_dict, timed_answer
from shadow.records import Answer, PairRecord

REQUEST = GenerationRequest("r1", SamplingParams(16, 0.0, stop=("\n",)),
                            messages=(Message("user", "hi"),))


async def deltas(items):
    for d in items:
        yield d


async def test_timed_answer_measures_ttft_and_latency_with_the_given_clock():
    ticks = itertools.count(10.0, 0.5)  # read at the start, the first token and the end
    answer, logprobs = await timed_answer(deltas([
        Delta("", ()),
        Delta("Hel", (1,), (TokenLogprob("Hel", float("-inf"), (("Hel", -0.1),)),)),
        Delta("lo", (2,), None, "stop", 5, 2),
    ]), "teacher", "t1", clock=lambda: next(ticks))
    assert answer.text == "Hello" and answer.finish_reason == "stop"
    assert (answer.prompt_tokens, answer.completion_tokens) == (5, 2)
    assert answer.ttft_ms == 500.0 and answer.latency_ms == 1000.0
    assert logprobs == [{"token": "Hel", "logprob": -9999.0, "top": [["Hel", -0.1]]}]


async def test_timed_answer_without_tokens_has_no_ttft():
    answer, logprobs = await timed_answer(deltas([Delta("", (), None, "stop", 3, 0)]), "m", None)
    assert answer.ttft_ms is None and answer.text == "" and logprobs is None


def test_request_dict_is_json_ready():
    out = request_dict(REQUEST)
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    assert out["params"]["stop"] == ["\n"] and out["params"]["max_tokens"] == 16
    prompt = request_dict(GenerationRequest("r2", SamplingParams(4), prompt="Once"))
    assert prompt["prompt"] == "Once" and "messages" not in prompt
    assert out["params"]["response_format"] is None


def test_request_dict_keeps_the_response_format():
    import json

    fmt = parse_response_format({"type": "json_schema", "json_schema": {
        "name": "t", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    request = GenerationRequest("r3", SamplingParams(8, response_format=fmt),
                                messages=(Message("user", "hi"),))
    kept = json.loads(json.dumps(request_dict(request)))["params"]["response_format"]
    assert kept == fmt.openai() and kept["json_schema"]["schema"]["properties"]["a"]
    labels = GenerationRequest("r4", SamplingParams(8, response_format=choice_of(["x", "y"])),
                               prompt="p")
    assert request_dict(labels)["params"]["response_format"] == {"type": "choice",
                                                                 "labels": ["x", "y"]}


def test_make_record_round_trips():
    student = Answer("student", "s1", "a", "stop", 3, 1, 1.0, 2.0)
    teacher = Answer("teacher", "t1", "b", "stop", 3, 1, 3.0, 4.0)
    job = MirrorJob("chatcmpl-1", "route", "student", "teacher", REQUEST, True, student,
                    "2026-11-28T21:00:00+00:00")
    record, redacted = make_record(job, teacher, None, {"disagreement": 0.5})
    assert record.pair_id == "chatcmpl-1" and record.disagreement == 0.5
    assert PairRecord.from_json(record.to_json()) == record and redacted == {}


def test_make_record_redacts_prompt_and_answers_and_can_drop_the_prompt():
    from dataclasses import replace

    from shadow.config import RedactionSettings

    redactor = RedactionSettings(patterns={"ticket": r"TCK-[0-9]+"}).redactor()
    request = GenerationRequest("r1", SamplingParams(16), messages=(
        Message("system", "be brief"),
        Message("user", "I am ann@example.com, card 4111 1111 1111 1111, ticket TCK-991")))
    student = Answer("student", "s1", "Mail ann@example.com", "stop", 3, 1, 1.0, 2.0)
    teacher = Answer("teacher", "t1", "Call +44 20 7946 0958 from 10.0.0.7", "stop", 3, 1,
                     3.0, 4.0)
    job = MirrorJob("chatcmpl-1", "route", "student", "teacher", request, True, student,
                    "2026-11-28T21:00:00+00:00")
    record, redacted = make_record(job, teacher, None, {}, redactor)
    assert record.request["messages"][1]["content"] == (
        "I am [EMAIL], card [CARD], ticket [TICKET]")
    assert record.request["messages"][0]["content"] == "be brief"
    assert record.student.text == "Mail [EMAIL]"
    assert record.teacher.text == "Call [PHONE] from [IP]"
    assert redacted == {"email": 2, "card": 1, "ticket": 1, "phone": 1, "ip": 1}
    assert "ann@example.com" not in record.to_json()

    bare, _ = make_record(replace(job, store_prompt=False), teacher, None, {}, redactor)
    assert set(bare.request) == {"params"} and "ann" not in bare.to_json()
    assert RedactionSettings(enabled=False).redactor() is None


def test_make_record_redacts_teacher_logprobs_and_cleans_unstorable_text():
    from shadow.config import RedactionSettings

    redactor = RedactionSettings().redactor()
    request = GenerationRequest("r1", SamplingParams(16), messages=(
        Message("user", "hi \ud800 there\x00"),))
    student = Answer("student", "s1", "ok \udfff", "stop", 3, 1, 1.0, 2.0)
    text = "Reach jane.doe@example.com or card 4111 1111 1111 1111"
    tokens = ["Reach", " jane", ".doe", "@example", ".com", " or", " card", " 4111", " 1111",
              " 1111", " 1111"]
    logprobs = [{"token": t, "logprob": -0.1, "top": [[t, -0.1], ["\ud83d", -2.0]]}
                for t in tokens]
    teacher = Answer("teacher", "t1", text, "stop", 3, len(tokens), 3.0, 4.0)
    job = MirrorJob("chatcmpl-1", "route", "student", "teacher", request, True, student,
                    "2026-11-28T21:00:00+00:00")
    record, redacted = make_record(job, teacher, logprobs, {}, redactor)
    stored = record.to_json()
    assert record.teacher.text == "Reach [EMAIL] or card [CARD]"
    assert [e["token"] for e in record.teacher_logprobs] == ["Reach"]  # cut before the e-mail
    for raw in ("jane", "doe", "4111"):
        assert raw not in stored
    assert record.request["messages"][0]["content"] == "hi \ufffd there\ufffd"
    assert record.student.text == "ok \ufffd"
    assert record.teacher_logprobs[0]["top"][1][0] == "\ufffd"
    stored.encode("utf-8")  # storable: no lone surrogate left
    assert redacted == {"email": 1, "card": 1}


def test_redaction_config_errors_name_the_pattern():
    with pytest.raises(ConfigError, match=r"shadow\.redaction\.patterns.*'id'.*bad regex"):
        load_settings(None, variants={"v": {"engine": {"engine": "fake"}}},
                      routes={"r": {"variant": "v"}},
                      shadow={"redaction": {"patterns": {"id": "(E"}}})


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        ({"sample_rate": 0.5}, "exactly one of"),
        ({"variant": "v", "remote": {"base_url": "http://x", "model": "m"}}, "exactly one of"),
        ({"variant": "nope"}, "routes.r.shadow.variant: 'nope' is not a variant"),
        ({"variant": "v", "sample_rate": 1.5}, "routes.r.shadow.sample_rate: 1.5"),
    ],
)
def test_shadow_target_config_errors(shadow, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_settings(None, variants={"v": {"engine": {"engine": "fake"}}},
                      routes={"r": {"variant": "v", "shadow": shadow}})


def test_score_weights_and_labels_come_from_config():
    s = load_settings(None, variants={"v": {"engine": {"engine": "fake"}}},
                      routes={"r": {"variant": "v", "labels": ["spam", "ham"]}},
                      shadow={"weights": {"semantic": 0, "label_agreement": 9}})
    assert s.shadow.weights.semantic == 0 and s.shadow.weights.label_agreement == 9
    assert s.routes["r"].labels == ["spam", "ham"]
    zeros = dict.fromkeys(s.shadow.weights.model_dump(), 0)
    with pytest.raises(ConfigError, match="at least one score weight must be positive"):
        load_settings(None, variants={"v": {"engine": {"engine": "fake"}}},
                      routes={"r": {"variant": "v"}}, shadow={"weights": zeros})
    with pytest.raises(ConfigError, match=r"routes\.r\.labels"):
        load_settings(None, variants={"v": {"engine": {"engine": "fake"}}},
                      routes={"r": {"variant": "v", "labels": ["only-one"]}})
