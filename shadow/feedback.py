"""Feedback on answered responses: the `/v1/feedback` body, checked against declared metrics.

    POST /v1/feedback  {"response_id": "chatcmpl-…", "metric": "thumbs_up", "value": true}

`parse_feedback` is pure: it turns a body into a `FeedbackPost` or raises `OpenAIError` (400 with
the bad `param`). Finding the response (404 when unknown), storing the feedback and the
Prometheus aggregates belong to the shadow worker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import OpenAIError
from shadow.config import FeedbackMetric
from shadow.records import unstorable

MAX_COMMENT = 4096  # characters
MAX_ID = 256


@dataclass(frozen=True)
class FeedbackPost:
    response_id: str
    metric: str
    value: float | None  # boolean metrics: 1.0 or 0.0
    comment: str | None  # comment metrics


def parse_feedback(body: bytes, metrics: Mapping[str, FeedbackMetric]) -> FeedbackPost:
    data = OpenAIError.load_json(body)
    if not isinstance(data, dict):
        raise OpenAIError.not_json_object(type(data).__name__)
    unknown = sorted(set(data) - {"response_id", "metric", "value"})
    if unknown:
        raise OpenAIError.invalid_value(unknown[0], "Unknown field; feedback takes "
                                        "response_id, metric and value.", code="unknown_field")
    response_id, name = data.get("response_id"), data.get("metric")
    if (not isinstance(response_id, str) or not 0 < len(response_id) <= MAX_ID
            or unstorable(response_id)):
        raise OpenAIError.invalid_value(
            "response_id", "response_id must be the id of a response this gateway answered.")
    if not isinstance(name, str) or name not in metrics:
        known = ", ".join(sorted(metrics)) or "none are declared"
        raise OpenAIError.invalid_value(
            "metric", f"Unknown feedback metric (declared: {known}).", code="unknown_metric")
    if "value" not in data:
        raise OpenAIError.invalid_value("value", "value is required.")
    metric, value = metrics[name], data["value"]
    if metric.type == "boolean":
        if not isinstance(value, bool):
            raise OpenAIError.invalid_value("value", f"{name} is a boolean metric: send true "
                                            "or false.")
        return FeedbackPost(response_id, name, 1.0 if value else 0.0, None)
    if metric.type == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            raise OpenAIError.invalid_value("value", f"{name} is a numeric metric: send a "
                                            "number.")
        low = -math.inf if metric.min is None else metric.min
        high = math.inf if metric.max is None else metric.max
        if not low <= value <= high:
            raise OpenAIError.invalid_value("value", f"{name} must be between {metric.min} and "
                                            f"{metric.max}.")
        return FeedbackPost(response_id, name, float(value), None)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_COMMENT:
        raise OpenAIError.invalid_value("value", f"{name} is a comment: send non-empty text of "
                                        f"at most {MAX_COMMENT} characters.")
    if problem := unstorable(value):
        raise OpenAIError.invalid_value("value", f"{name}: the comment must not contain "
                                        f"{problem}.")
    return FeedbackPost(response_id, name, None, value)
