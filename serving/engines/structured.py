"""Structured outputs: OpenAI's `response_format`, checked, compiled to a grammar, and verified.

    parse_response_format(value) -> ResponseFormat | None   raises FormatError(param, message)
    choice_of(labels) -> ResponseFormat                       exactly one label (label routes)
    grammar_for(format) -> str                                llguidance grammar, cached by schema
    check_answer(format, text) -> str | None                  why the text does not conform
    split_calls(text) -> (content, calls)                     an answer's tool calls, as written

`text` asks for nothing. `json_object` is any JSON object. `json_schema` is `{name, schema,
strict, description}`; the schema must be a valid JSON Schema (Draft 2020-12) and use only the
keywords the grammar compiler implements: an unimplemented one (`not`, `uniqueItems`, ...) is a
`FormatError` naming it, never a silent fallback to free text. Engines turn the grammar into a
token mask (`serving.engines.constrain`), so a finished answer always parses and validates;
`check_answer` is what says so, for every engine (a remote upstream included).

A `tool_calls` format (built by `serving.engines.tools`) is one or more calls, each written
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (Hermes's form, Qwen's template's):
`schema` is one call's JSON Schema, `parallel` allows several, `text_allowed` lets an answer in
plain text stand instead, optionally before the calls (`tool_choice: auto`). There, an answer that
is one bare JSON object (small models often drop the tags) is read as a call too, and so it must
be a valid one: plain text is what neither opens a `<tool_call>` nor begins with `{`.

Pure: no I/O, no clock. The compiled grammars and validators are cached by the schema's
canonical JSON text (its hash keys the cache), so a schema sent with every request compiles once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from core.errors import json_type

CACHE_SIZE = 256  # distinct schemas whose grammar and validator stay compiled
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for `json_schema.name` (fullmatch)
# Whitespace the grammar lets a model put between JSON tokens: nothing, a space, or a newline
# and an indent of up to 12 spaces (pretty-printing six levels deep). Bounded, so that a small
# model cannot spend its whole budget on blanks.
WHITESPACE = r"( |\n {0,12})?"
ANY_OBJECT = '{"type": "object"}'
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class FormatError(ValueError):
    """A `response_format` this server refuses: `param` is where, the message says why."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What the answer must be. `schema` is canonical JSON text (sorted keys); a `choice` is
    exactly one of `labels` (a label-constrained route's answers)."""

    type: Literal["json_object", "json_schema", "choice", "tool_calls"]
    schema: str = ANY_OBJECT
    name: str | None = None
    strict: bool | None = None
    description: str | None = None
    labels: tuple[str, ...] = ()
    parallel: bool = False  # tool_calls: more than one call allowed
    text_allowed: bool = False  # tool_calls: plain text may stand instead of (or before) calls

    def openai(self) -> dict[str, Any] | None:
        """The `response_format` to send upstream (a remote engine passes it through); None for
        a choice, which OpenAI's API cannot express, and for tool calls (sent as `tools`)."""
        if self.type in ("choice", "tool_calls"):
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        spec: dict[str, Any] = {"name": self.name, "schema": json.loads(self.schema)}
        if self.strict is not None:
            spec["strict"] = self.strict
        if self.description is not None:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}

    def stored(self) -> dict[str, Any]:
        """As a pair or a dataset keeps it: OpenAI's form, the labels of a choice, or the call
        schema of tool calls (the request's `tools` are kept beside it)."""
        if self.type == "tool_calls":
            return {"type": "tool_calls", "schema": json.loads(self.schema),
                    "parallel": self.parallel, "text_allowed": self.text_allowed}
        return self.openai() or {"type": "choice", "labels": list(self.labels)}


def choice_of(labels: Sequence[str]) -> ResponseFormat:
    """The answer is exactly one of `labels`, nothing before or after it."""
    return ResponseFormat("choice", labels=tuple(labels))


def parse_response_format(value: Any) -> ResponseFormat | None:
    """The request's `response_format`, or None for free text; raises `FormatError`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FormatError("response_format", "Invalid type for 'response_format': expected an "
                          f"object, but got {json_type(value)} instead.")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        shown = json.dumps(kind)[:100] if kind is not None else "nothing"
        raise FormatError("response_format.type", "Invalid value for 'response_format.type': "
                          f"{shown}. Supported values are 'text', 'json_object' and "
                          "'json_schema'.")
    spec = value.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise FormatError(where, f"Missing required parameter: '{where}' (an object with "
                          "'name' and 'schema').")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise FormatError(f"{where}.name", f"Invalid '{where}.name': expected 1 to 64 of a-z, "
                          "A-Z, 0-9, '_' and '-'.")
    strict, description = spec.get("strict"), spec.get("description")
    if strict is not None and not isinstance(strict, bool):
        raise FormatError(f"{where}.strict", f"Invalid type for '{where}.strict': expected a "
                          f"boolean, but got {json_type(strict)} instead.")
    if description is not None and not isinstance(description, str):
        raise FormatError(f"{where}.description", f"Invalid type for '{where}.description': "
                          f"expected a string, but got {json_type(description)} instead.")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise FormatError(f"{where}.schema", f"Invalid type for '{where}.schema': expected an "
                          f"object (a JSON Schema), but got {json_type(schema)} instead.")
    text = json.dumps(schema, sort_keys=True, ensure_ascii=False)
    problem = schema_problem(text)
    if problem:
        raise FormatError(f"{where}.schema", f"Invalid '{where}.schema': {problem}")
    return ResponseFormat("json_schema", text, name, strict, description)


@lru_cache(maxsize=CACHE_SIZE)
def schema_problem(schema: str) -> str:
    """Why a schema cannot be enforced ('' when it can): invalid, or a keyword not implemented."""
    from jsonschema import Draft202012Validator, SchemaError
    from llguidance import LLMatcher

    try:
        Draft202012Validator.check_schema(json.loads(schema))
    except SchemaError as e:
        return f"not a valid JSON Schema at {_where(e.absolute_path)}: {e.message[:200]}"
    error = LLMatcher.validate_grammar(_grammar(schema))
    unimplemented = re.search(r"Unimplemented keys: \[(.*?)\]", error)
    if unimplemented:
        keys = ", ".join(f"'{k.strip().strip(chr(34))}'" for k in unimplemented.group(1).split(","))
        return (f"the keyword(s) {keys} cannot be enforced by this server's constrained "
                "decoding; remove them from the schema.")
    return f"this schema cannot be compiled to a grammar: {error[:300]}" if error else ""


def grammar_problem(fmt: ResponseFormat) -> str:
    """Why `fmt`'s grammar cannot be compiled ('' when it can)."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(grammar_for(fmt))
    return f"this cannot be compiled to a grammar: {error[:300]}" if error else ""


@lru_cache(maxsize=CACHE_SIZE)
def _grammar(schema: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_pattern": WHITESPACE, "lenient": False})


@lru_cache(maxsize=CACHE_SIZE)
def _choice_grammar(labels: tuple[str, ...]) -> str:
    from llguidance import LLMatcher

    # A JSON string literal is a valid Lark string literal: quotes and escapes included.
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in labels))


def calls_lark(fmt: ResponseFormat, special: Sequence[str] = ()) -> str:
    """A `tool_calls` format as a Lark grammar (llguidance's dialect, `%json` for a call). The
    markers in `special` are also single special tokens of the model's vocabulary (Qwen's
    `<tool_call>`): the grammar accepts them as the token as well as spelled out."""
    def tag(word: str) -> str:
        return f"({json.dumps(word)} | {word})" if word in special else json.dumps(word)

    call = json.loads(fmt.schema)
    call["x-guidance"] = {"whitespace_pattern": WHITESPACE, "lenient": False}
    return "\n".join([
        "start: TEXT | TEXT? calls | bare" if fmt.text_allowed else "start: calls",
        f"bare: %json {json.dumps(call)}",
        'calls: call ("\\n" call)*' if fmt.parallel else "calls: call",
        f'call: {tag(CALL_OPEN.strip())} "\\n" %json {json.dumps(call)} "\\n" '
        f"{tag(CALL_CLOSE.strip())}",
        # Plain text is anything that neither opens a call nor begins with `{` (a bare call):
        # a call, once begun, is constrained.
        f"TEXT: /(?s:.+)/ & ~/(?s:.*{re.escape(CALL_OPEN.strip())}.*)/"
        r" & ~/(?s:[ \t\n]*\{.*)/",
    ])


@lru_cache(maxsize=CACHE_SIZE)
def _lark_grammar(lark: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(lark)


def grammar_for(fmt: ResponseFormat, special: Sequence[str] = ()) -> str:
    """The llguidance grammar that accepts exactly the conforming answers (cached); `special`:
    see `calls_lark`."""
    if fmt.type == "choice":
        return _choice_grammar(fmt.labels)
    if fmt.type == "tool_calls":
        return _lark_grammar(calls_lark(fmt, tuple(special)))
    return _grammar(fmt.schema)


@lru_cache(maxsize=CACHE_SIZE)
def _validator(schema: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema))


def check_answer(fmt: ResponseFormat, text: str) -> str | None:
    """None when `text` conforms to `fmt`; else a short reason."""
    if fmt.type == "choice":
        return None if text in fmt.labels else "not one of the route's labels"
    if fmt.type == "tool_calls":
        return _check_calls(fmt, text)
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    error = next(iter(_validator(fmt.schema).iter_errors(value)), None)
    if error is not None:
        return f"does not match the schema at {_where(error.absolute_path)}: {error.message[:200]}"
    return None


def _check_calls(fmt: ResponseFormat, text: str) -> str | None:
    content, calls = split_calls(text)
    if not calls:
        if not fmt.text_allowed:
            return "no tool call"
        if CALL_OPEN.strip() in text:
            return "an unfinished tool call"
        return "a JSON object that is not a call" if text.lstrip().startswith("{") else None
    if len(calls) > 1 and not fmt.parallel:
        return f"{len(calls)} tool calls where one is allowed"
    if content and not fmt.text_allowed:
        return "text beside the tool calls"
    for i, call in enumerate(calls):
        if call is None:
            return f"tool call {i} is not JSON"
        error = next(iter(_validator(fmt.schema).iter_errors(call)), None)
        if error is not None:
            return (f"tool call {i} does not match the tools at {_where(error.absolute_path)}: "
                    f"{error.message[:200]}")
    return None


def split_calls(text: str) -> tuple[str, list[dict | None]]:
    """The text outside `<tool_call>` blocks (stripped), and each block's JSON value (None where
    it is not JSON); text after an unclosed `<tool_call>` stays in the content. An answer with
    no block that is one bare JSON object with `name` and `arguments` is that one call."""
    calls: list[dict | None] = []
    for block in _CALL.findall(text):
        try:
            calls.append(json.loads(block))
        except ValueError:
            calls.append(None)
    if not calls and text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict) and {"name", "arguments"} <= value.keys():
            return "", [value]
    return _CALL.sub("", text).strip(), calls


def _where(path: Any) -> str:
    """A JSON Schema error's location, e.g. `items/0/name`; `(root)` for the whole value."""
    return "/".join(str(p) for p in path) or "(root)"
