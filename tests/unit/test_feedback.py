"""parse_feedback: a body becomes a FeedbackPost, or a 400 that names the bad param."""

from __future__ import annotations

import json

import pytest

from core.errors import OpenAIError
from shadow.config import FeedbackMetric
from shadow.feedback import MAX_COMMENT, FeedbackPost, parse_feedback

METRICS = {
    "thumbs_up": FeedbackMetric(type="boolean"),
    "rating": FeedbackMetric(type="float", min=1, max=5),
    "latency_ok": FeedbackMetric(type="float"),
    "note": FeedbackMetric(type="comment"),
}


def parse(**body):
    return parse_feedback(json.dumps(body).encode(), METRICS)


def test_each_type_parses():
    assert parse(response_id="r", metric="thumbs_up", value=True) == FeedbackPost(
        "r", "thumbs_up", 1.0, None)
    assert parse(response_id="r", metric="thumbs_up", value=False).value == 0.0
    assert parse(response_id="r", metric="rating", value=5).value == 5.0
    assert parse(response_id="r", metric="rating", value=1.5).value == 1.5
    assert parse(response_id="r", metric="latency_ok", value=-1e9).value == -1e9
    assert parse(response_id="r", metric="note", value="ok") == FeedbackPost(
        "r", "note", None, "ok")


@pytest.mark.parametrize(("body", "param"), [
    ({"metric": "thumbs_up", "value": True}, "response_id"),
    ({"response_id": "", "metric": "thumbs_up", "value": True}, "response_id"),
    ({"response_id": 7, "metric": "thumbs_up", "value": True}, "response_id"),
    ({"response_id": "r" * 257, "metric": "thumbs_up", "value": True}, "response_id"),
    ({"response_id": "r", "metric": "stars", "value": 1}, "metric"),
    ({"response_id": "r", "value": 1}, "metric"),
    ({"response_id": "r", "metric": "thumbs_up"}, "value"),
    ({"response_id": "r", "metric": "thumbs_up", "value": 1}, "value"),
    ({"response_id": "r", "metric": "thumbs_up", "value": "true"}, "value"),
    ({"response_id": "r", "metric": "rating", "value": 0.5}, "value"),
    ({"response_id": "r", "metric": "rating", "value": 5.01}, "value"),
    ({"response_id": "r", "metric": "rating", "value": True}, "value"),
    ({"response_id": "r", "metric": "rating", "value": "4"}, "value"),
    ({"response_id": "r", "metric": "note", "value": "  "}, "value"),
    ({"response_id": "r", "metric": "note", "value": "x" * (MAX_COMMENT + 1)}, "value"),
    ({"response_id": "r", "metric": "note", "value": 3}, "value"),
    ({"response_id": "r", "metric": "note", "value": "x", "extra": 1}, "extra"),
])
def test_bad_bodies_name_the_param(body, param):
    with pytest.raises(OpenAIError) as e:
        parse(**body)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_non_json_and_non_objects_and_nan():
    for body in (b"{", b"[1]", b'"x"', b"\xff"):
        with pytest.raises(OpenAIError) as e:
            parse_feedback(body, METRICS)
        assert e.value.code == "invalid_json"
    with pytest.raises(OpenAIError) as e:
        parse_feedback(b'{"response_id": "r", "metric": "latency_ok", "value": NaN}', METRICS)
    assert e.value.param == "value"


def test_no_metrics_declared_says_so():
    with pytest.raises(OpenAIError, match="none are declared"):
        parse_feedback(b'{"response_id": "r", "metric": "thumbs_up", "value": true}', {})


def test_float_bounds_only_for_float_metrics():
    with pytest.raises(ValueError, match="float metrics only"):
        FeedbackMetric(type="boolean", min=0)
    with pytest.raises(ValueError, match="greater than max"):
        FeedbackMetric(type="float", min=5, max=1)


@pytest.mark.parametrize(("body", "param"), [
    (b'{"response_id": "r", "metric": "note", "value": "a\\ud800b"}', "value"),  # lone surrogate
    (b'{"response_id": "r", "metric": "note", "value": "a\\u0000b"}', "value"),  # NUL
    (b'{"response_id": "r\\udfff", "metric": "note", "value": "ok"}', "response_id"),
])
def test_text_no_store_can_keep_is_a_400_naming_the_field(body, param):
    with pytest.raises(OpenAIError) as e:
        parse_feedback(body, METRICS)
    assert (e.value.status, e.value.param) == (400, param)


def test_json_nested_too_deeply_is_a_400_not_a_500():
    body = b'{"response_id": "r", "metric": "note", "value": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    with pytest.raises(OpenAIError) as e:
        parse_feedback(body, METRICS)
    assert e.value.status == 400 and "nested too deeply" in e.value.message
