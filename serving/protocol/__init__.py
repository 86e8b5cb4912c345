"""OpenAI request models: parse and validate a request body, then turn it into engine requests.

`parse_request(kind, body)` is the one entry point. It returns a `ChatCompletionRequest` or a
`CompletionRequest`, or raises `OpenAIError` 400 whose `param` is the offending field written the
OpenAI way (`temperature`, `messages[0].content[1].type`) and whose message says what was sent and
what is allowed. No pydantic error escapes. `to_generation_requests(request_id, defaults)` fans a
request out into `n` engine requests (choice i gets `seed + i`; an omitted temperature or top_p
takes the serving variant's `defaults`; a route's `constraint` replaces the response format).

Rules: JSON `null` is the same as leaving a field out; a number with no fraction (`16.0`) is an
integer, as in JSON Schema, but `16.5` and `"16"` are not; unknown fields are accepted and ignored
(`unknown_fields()` names them so the app can log each once); known OpenAI fields that we accept but
do not act on (penalties, logit_bias, ...) are listed by `ignored_fields()` when sent
with a value that would change the answer. Types are strict: `"1"` is not an integer.

Owns no I/O, no clock and no knowledge of routes, engines or response shapes. The models are in
`chat` and `completions`; what they share (the strict base model, stop, seed, sampling) in
`fields`; this module maps pydantic's errors to OpenAI's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationError

from core.errors import OpenAIError, json_type
from serving.protocol.chat import ChatCompletionRequest
from serving.protocol.completions import CompletionRequest
from serving.protocol.fields import INT64_MAX, INT64_MIN, OpenAIBaseModel, show

__all__ = ["INT64_MAX", "INT64_MIN", "ChatCompletionRequest", "CompletionRequest", "parse_request",
           "unknown_fields"]


# -- entry point --------------------------------------------------------------------------------

_MODELS: dict[str, type[OpenAIBaseModel]] = {
    "chat": ChatCompletionRequest,
    "completion": CompletionRequest,
}

_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "tuple_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}

_BOUNDS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


def _param(loc: tuple[int | str, ...]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _to_openai_error(err: dict) -> OpenAIError:
    """One pydantic error, rewritten as OpenAI would say it."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "openai":
        return OpenAIError.invalid_value(ctx["param"], ctx["message"])
    param = _param(err["loc"])
    if kind == "json_invalid":
        return OpenAIError.invalid_json(ctx.get("error"))
    if param is None and kind in ("model_type", "model_attributes_type", "dict_type"):
        return OpenAIError.not_json_object(json_type(value))
    if kind == "missing":
        return OpenAIError.invalid_value(
            param, f"Missing required parameter: '{param}'.", "missing_required_parameter"
        )
    if kind in _TYPE_NAMES:
        return OpenAIError.invalid_value(
            param,
            f"Invalid type for '{param}': expected {_TYPE_NAMES[kind]}, but got "
            f"{json_type(value)} instead.",
            "invalid_type",
        )
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return OpenAIError.invalid_value(
            param,
            f"Invalid '{param}': expected a value {_BOUNDS[kind]} {bound}, but got "
            f"{show(value)} instead.",
        )
    if kind == "finite_number":
        return OpenAIError.invalid_value(
            param, f"Invalid '{param}': expected a finite number, but got {show(value)} instead."
        )
    if kind in ("string_too_short", "string_too_long"):
        edge = "at least" if kind == "string_too_short" else "at most"
        limit = ctx.get("min_length" if kind == "string_too_short" else "max_length")
        unit = "character" if limit == 1 else "characters"
        return OpenAIError.invalid_value(
            param,
            f"Invalid '{param}': expected a string of {edge} {limit} {unit}, but got "
            f"{show(value)} instead.",
        )
    if kind in ("too_short", "too_long"):
        edge = "at least" if kind == "too_short" else "at most"
        limit = ctx.get("min_length" if kind == "too_short" else "max_length")
        return OpenAIError.invalid_value(
            param,
            f"Invalid '{param}': expected {edge} {limit} characters or items, but got "
            f"{ctx.get('actual_length')}.",
        )
    msg = err.get("msg", "invalid value")
    return OpenAIError.invalid_value(param, f"Invalid '{param}': {msg}; got {show(value)}.")


def unknown_fields(request: OpenAIBaseModel) -> tuple[str, ...]:
    """`request.unknown_fields()`, as a function."""
    return request.unknown_fields()


def parse_request(
    kind: Literal["chat", "completion"], body: bytes | str
) -> ChatCompletionRequest | CompletionRequest:
    """Validate a request body; raises `OpenAIError` 400 for the first thing wrong with it."""
    model = _MODELS[kind]
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise _to_openai_error(errors[0]) from None
