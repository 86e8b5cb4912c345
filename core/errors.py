"""Errors the gateway returns to clients, always in OpenAI's shape.

    OpenAIError(status, message, type, param, code, headers)    .body() -> {"error": {...}}
    ├── 400 invalid_request_error  invalid_value(param, message) (alias invalid(message, param)),
    │                              invalid_json(detail), not_json_object(got),
    │                              context_length_exceeded(message, param)
    ├── 401 authentication_error   bad_auth()  (alias unauthorized)
    ├── 404 not_found_error        unknown_model(model) (alias not_found_model), not_found(path)
    ├── 408 timeout_error          timeout(seconds)
    ├── 413 invalid_request_error  body_too_large(limit)              code body_too_large
    ├── 415 invalid_request_error  unsupported_media_type(type)       code unsupported_media_type
    ├── 429 rate_limit_error       rate_limited(retry_after)          + Retry-After
    ├── 500 server_error           server_error()
    └── 503 server_error           busy(retry_after)                  code server_busy + Retry-After

One class, no subclasses: handlers catch `OpenAIError` and answer
`JSONResponse(err.body(), err.status, headers=err.headers)`. Messages never carry internals (paths,
hosts, keys, tracebacks); the body is bounded in size whatever the client sent. `clip` and
`json_type` ("an integer", "an object", ...) are how messages quote what the client sent.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_MESSAGE = 1000  # characters of `message` in a body; longer ones end with an ellipsis
MAX_PARAM = 200  # characters of `param`
MAX_ECHO = 100  # characters of a client value quoted inside a message


def _retry_after(delay: float) -> dict[str, str]:
    """The Retry-After header: whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(delay)))}


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the last one an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


_JSON_TYPES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "an array"), (dict, "an object"))  # bool first: it is an int too


def json_type(value: object) -> str:
    """How a message names the JSON type of a client value: "an integer", "an object", ..."""
    if value is None:
        return "null"
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)),
                type(value).__name__)


class OpenAIError(Exception):
    """An error answer: HTTP status plus OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return (
            f"OpenAIError({self.status}, {self.type!r}, param={self.param!r}, code={self.code!r})"
        )

    def body(self) -> dict:
        param = clip(self.param, MAX_PARAM) if self.param is not None else None
        return {
            "error": {
                "message": clip(self.message, MAX_MESSAGE),
                "type": self.type,
                "param": param,
                "code": self.code,
            }
        }

    # -- 400 ---------------------------------------------------------------------------------

    @classmethod
    def invalid_value(
        cls, param: str | None, message: str, code: str | None = "invalid_value"
    ) -> OpenAIError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def invalid_json(cls, detail: str | None = None) -> OpenAIError:
        """`detail`: the parser's words, e.g. "EOF while parsing a value at line 1 column 9"."""
        where = f" ({clip(detail, MAX_ECHO)})" if detail else ""
        return cls(400, f"We could not parse the JSON body of your request{where}. The body "
                   "must be valid JSON (UTF-8) holding one object.", code="invalid_json")

    @classmethod
    def load_json(cls, body: bytes) -> Any:
        """The JSON value of a request body; an `invalid_json` 400 for anything unparsable,
        nesting too deep for the parser included (never a 500)."""
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise cls.invalid_json(str(e)) from None
        except RecursionError:
            raise cls.invalid_json("nested too deeply") from None

    @classmethod
    def not_json_object(cls, got: str) -> OpenAIError:
        return cls(400, f"The request body must be a JSON object, but got {got} instead.",
                   code="invalid_json")

    @classmethod
    def context_length_exceeded(cls, message: str, param: str = "messages") -> OpenAIError:
        """The prompt does not fit: pass `str(PromptTooLong)`; param "messages" or "prompt"."""
        return cls(400, message, param=param, code="context_length_exceeded")

    # -- 401 / 404 / 408 / 413 / 415 ---------------------------------------------------------

    @classmethod
    def bad_auth(cls) -> OpenAIError:
        return cls(401, "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`.",
                   "authentication_error", code="invalid_api_key")

    @classmethod
    def unknown_model(cls, model: str) -> OpenAIError:
        """Names only what the client sent; never the list of routes or variants."""
        return cls(404, f"The model `{clip(model, MAX_ECHO)}` does not exist or you do not have "
                   "access to it. GET /v1/models lists the models you can use.",
                   "not_found_error", "model", "model_not_found")

    @classmethod
    def not_found(cls, path: str) -> OpenAIError:
        return cls(404, f"Unknown request URL: {clip(path, MAX_ECHO)}. Please check the URL and "
                   "method.", "not_found_error", code="unknown_url")

    @classmethod
    def timeout(cls, seconds: float | None = None) -> OpenAIError:
        after = f" after {seconds:g} s" if seconds is not None else ""
        return cls(408, f"The request timed out{after} before the model finished. Retry, or ask "
                   "for fewer tokens.", "timeout_error", code="timeout")

    @classmethod
    def body_too_large(cls, limit: int) -> OpenAIError:
        return cls(413, f"The request body is larger than the limit of {limit} bytes.",
                   code="body_too_large")

    @classmethod
    def unsupported_media_type(cls, content_type: str | None) -> OpenAIError:
        got = clip(content_type, MAX_ECHO) if content_type else "none"
        return cls(415, f"Unsupported Content-Type {got!r}: send the body as application/json.",
                   code="unsupported_media_type")

    # -- 429 / 500 / 503 ---------------------------------------------------------------------

    @classmethod
    def rate_limited(cls, retry_after: float = 1) -> OpenAIError:
        return cls(429, "Too many requests. Please slow down and retry after the Retry-After "
                   "delay.", "rate_limit_error", code="rate_limit_exceeded",
                   headers=_retry_after(retry_after))

    @classmethod
    def server_error(cls) -> OpenAIError:
        return cls(500, "The server had an error while processing your request. Sorry about "
                   "that!", "server_error")

    @classmethod
    def busy(cls, retry_after: float = 1) -> OpenAIError:
        message = "The server is busy with other requests. Please retry after the Retry-After " \
                  "delay."
        return cls(503, message, "server_error", code="server_busy",
                   headers=_retry_after(retry_after))

    # -- other names for the same errors ------------------------------------------------------

    @classmethod
    def invalid(
        cls, message: str, param: str | None = None, code: str | None = "invalid_value"
    ) -> OpenAIError:
        """`invalid_value` with the message first."""
        return cls.invalid_value(param, message, code)

    unauthorized = bad_auth
    not_found_model = unknown_model
