"""Function calling: OpenAI's `tools`, checked, written into the prompt and read back from answers.

    parse_tools(tools, tool_choice, parallel_tool_calls) -> ToolUse | None   raises FormatError
    ToolUse.format() -> ResponseFormat         what the answer must be (constrained decoding)
    prompt_messages(messages, use, native)     the history and tools as a chat template takes them
    read_calls(text, response_id, choice)      an answer's content and `ToolCall`s
    CallStream                                 the same for a streamed answer, call by call

Every engine writes a call in one form, Hermes's, which Qwen's chat template teaches:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that renders `tools` in that form (`renders_tools`: Qwen2.5, Qwen3, Hermes) gets
the tools, the assistant's calls and the `tool` results as it expects them. Any other template
gets `GENERIC_PROMPT` (the same instructions, in words) appended to its system message, earlier
calls written as assistant text and results as `<tool_response>` user turns. `required` and a
named function constrain decoding to valid calls (name from the list, arguments valid against its
`parameters`); `auto` lets the model answer in text, but a call it opens is constrained the same
way; `none` leaves the tools out of the prompt. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import json_type
from serving.engines.structured import (
    CALL_CLOSE,
    CALL_OPEN,
    NAME,
    FormatError,
    ResponseFormat,
    grammar_problem,
    schema_problem,
    split_calls,
)

MAX_TOOLS = 128  # OpenAI's limit
NO_PARAMETERS = {"type": "object", "properties": {}}
OPEN, CLOSE = CALL_OPEN.strip(), CALL_CLOSE.strip()
GENERIC_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: str  # the JSON Schema of the arguments, JSON text in the client's key order
    description: str | None = None
    strict: bool | None = None

    def openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = json.loads(self.parameters)
        if self.strict is not None:
            function["strict"] = self.strict
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class ToolUse:
    """The tools a request offers and how it lets the model use them."""

    tools: tuple[Tool, ...]
    choice: str  # "auto", "required", or the one function's name that must be called
    parallel: bool = True

    def format(self) -> ResponseFormat:
        """The answer's constraint: calls to these tools (or, with `auto`, text instead)."""
        named = self.choice not in ("auto", "required")
        tools = [t for t in self.tools if t.name == self.choice] if named else self.tools
        calls = [{"type": "object",
                  "properties": {"name": {"const": t.name},
                                 "arguments": json.loads(t.parameters)},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for t in tools]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return ResponseFormat("tool_calls", json.dumps(schema, ensure_ascii=False),
                              parallel=self.parallel and not named,
                              text_allowed=self.choice == "auto")

    def openai(self) -> dict[str, Any]:
        """`tools`, `tool_choice` and `parallel_tool_calls` as OpenAI's API writes them."""
        choice: Any = self.choice
        if choice not in ("auto", "required"):
            choice = {"type": "function", "function": {"name": choice}}
        return {"tools": [t.openai() for t in self.tools], "tool_choice": choice,
                "parallel_tool_calls": self.parallel}


def _tool(value: Any, where: str) -> Tool:
    if not isinstance(value, dict):
        raise FormatError(where, f"Invalid type for '{where}': expected an object, but got "
                          f"{json_type(value)} instead.")
    if value.get("type") != "function":
        raise FormatError(f"{where}.type", f"Invalid value for '{where}.type': "
                          f"{json.dumps(value.get('type'))[:100]}. Only 'function' tools are "
                          "supported.")
    fn = value.get("function")
    if not isinstance(fn, dict):
        raise FormatError(f"{where}.function", f"Missing required parameter: '{where}.function' "
                          "(an object with 'name' and 'parameters').")
    name, description = fn.get("name"), fn.get("description")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise FormatError(f"{where}.function.name", f"Invalid '{where}.function.name': expected "
                          "1 to 64 of a-z, A-Z, 0-9, '_' and '-'.")
    if description is not None and not isinstance(description, str):
        raise FormatError(f"{where}.function.description", "Invalid type for "
                          f"'{where}.function.description': expected a string, but got "
                          f"{json_type(description)} instead.")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise FormatError(f"{where}.function.strict", "Invalid type for "
                          f"'{where}.function.strict': expected a boolean, but got "
                          f"{json_type(strict)} instead.")
    parameters = fn.get("parameters", NO_PARAMETERS)
    at = f"{where}.function.parameters"
    if not isinstance(parameters, dict):
        raise FormatError(at, f"Invalid type for '{at}': expected an object (a JSON Schema), "
                          f"but got {json_type(parameters)} instead.")
    problem = schema_problem(json.dumps(parameters, sort_keys=True, ensure_ascii=False))
    if problem:
        raise FormatError(at, f"Invalid '{at}': {problem}")
    return Tool(name, json.dumps(parameters, ensure_ascii=False), description, strict)


def parse_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any = None
                ) -> ToolUse | None:
    """The request's tool use, or None when the model may not call any (no tools, or
    `tool_choice: "none"`); raises `FormatError` naming the field."""
    if tools is not None and not isinstance(tools, list):
        raise FormatError("tools", "Invalid type for 'tools': expected an array, but got "
                          f"{json_type(tools)} instead.")
    if len(tools or ()) > MAX_TOOLS:
        raise FormatError("tools", f"Invalid 'tools': expected at most {MAX_TOOLS} tools, but "
                          f"got {len(tools)}.")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise FormatError("parallel_tool_calls", "Invalid type for 'parallel_tool_calls': "
                          f"expected a boolean, but got {json_type(parallel_tool_calls)} instead.")
    parsed = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(tools or ()))
    names = [t.name for t in parsed]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise FormatError(f"tools[{i}].function.name", f"Invalid 'tools[{i}].function.name':"
                              f" {name!r} is declared twice; tool names must be unique.")
    choice = _choice(tool_choice, names)
    if choice is None:
        return None
    use = ToolUse(parsed, choice, parallel_tool_calls is not False)
    problem = grammar_problem(use.format())
    if problem:
        raise FormatError("tools", f"Invalid 'tools': {problem}")
    return use


def _choice(value: Any, names: Sequence[str]) -> str | None:
    if value is None:
        return "auto" if names else None
    if value in ("none", "auto", "required"):
        if value != "none" and not names:
            raise FormatError("tool_choice", "Invalid 'tool_choice': it is only allowed when "
                              "'tools' are specified.")
        return None if value == "none" else value
    fn = value.get("function") if isinstance(value, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise FormatError("tool_choice", "Invalid 'tool_choice': expected 'none', 'auto', "
                          "'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}, "
                          f"but got {json.dumps(value)[:100]}.")
    if name not in names:
        raise FormatError("tool_choice", f"Invalid 'tool_choice': function {name[:64]!r} is not "
                          "one of the declared 'tools'.")
    return name


# -- the prompt ---------------------------------------------------------------------------------


def renders_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` and calls in the `<tool_call>` form itself."""
    return bool(template) and "tools" in template and OPEN in template


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it; `arguments` is JSON text (kept as text if not JSON)."""
    body = json.dumps({"name": name, "arguments": _arguments(arguments)}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def _arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def prompt_messages(messages: Sequence[Any], use: ToolUse | None, native: bool
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (each with `role`, `content`, and `tool_calls` / `tool_call_id` where they
    have them) and the tools, as a chat template takes them: a `native` template gets the
    tools and tool turns as they are (arguments as objects, as Qwen's template expects); any
    other gets plain role/content turns and the tools in its system message (tools: None)."""
    if native:
        out = []
        for m in messages:
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": _arguments(c.arguments)}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out, [t.openai() for t in use.tools] if use else None
    out = []
    for i, m in enumerate(messages):
        if m.role == "tool":  # consecutive results share one user turn
            response = f"<tool_response>\n{m.content}\n</tool_response>"
            if i and messages[i - 1].role == "tool":
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
            continue
        content = m.content
        if m.tool_calls:
            calls = "\n".join(call_text(c.name, c.arguments) for c in m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        out.append({"role": m.role, "content": content})
    if use is not None:
        listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in use.tools)
        prompt = GENERIC_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


# -- the answer ---------------------------------------------------------------------------------


def call_id(response_id: str, choice: int, k: int) -> str:
    """A stable id for call `k` of a choice: the same answer read twice gets the same ids."""
    digest = hashlib.sha256(f"{response_id}:{choice}:{k}".encode()).hexdigest()
    return "call_" + digest[:24]


def _as_call(value: Any, names: Sequence[str]) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a parsed call block naming a declared tool, else None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return value["name"], json.dumps(args, ensure_ascii=False)


def read_calls(text: str, names: Sequence[str], response_id: str, choice: int
               ) -> tuple[str | None, list[ToolCall]]:
    """The answer's content (None when it is only calls) and its calls. An answer with a block
    that is not a valid call to a declared tool is all content: nothing is dropped or guessed."""
    content, blocks = split_calls(text)
    calls = [_as_call(b, names) for b in blocks]
    if not calls or None in calls:
        return text, []
    return content or None, [ToolCall(call_id(response_id, choice, k), name, args)
                             for k, (name, args) in enumerate(calls)]


class CallStream:
    """Splits one streamed answer into content and whole calls, in order: `push(text)` returns
    the content strings and `ToolCall`s now complete; `flush()` what is left at the end (an
    unclosed call stays content). Text that may begin a call is held back until it is clear;
    whitespace between calls is dropped. An answer that begins with `{` may be a bare call
    (`serving.engines.structured.split_calls`): it is held whole and read at the end."""

    def __init__(self, names: Sequence[str], response_id: str, choice: int):
        self.names, self.response_id, self.choice = tuple(names), response_id, choice
        self.buffer, self.calls = "", 0
        self.bare: bool | None = None  # does the answer begin with `{` (a bare call)? None: unsaid

    def push(self, text: str) -> list[str | ToolCall]:
        self.buffer += text
        out: list[str | ToolCall] = []
        if self.bare is None and self.buffer.strip():
            self.bare = self.buffer.lstrip().startswith("{")
        if self.bare is not False:  # held whole: read at the end, like `read_calls`
            return out
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = next((k for k in range(min(len(OPEN) - 1, len(self.buffer)), 0, -1)
                             if self.buffer.endswith(OPEN[:k])), 0)
                self._content(self.buffer[:len(self.buffer) - keep], out)
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return out
            self._content(self.buffer[:start], out)
            self.buffer = self.buffer[start:]
            end = self.buffer.find(CLOSE)
            if end < 0:
                return out
            block, self.buffer = self.buffer[:end + len(CLOSE)], self.buffer[end + len(CLOSE):]
            _, values = split_calls(block)
            call = _as_call(values[0], self.names) if values else None
            if call is None:
                out.append(block)
            else:
                out.append(ToolCall(call_id(self.response_id, self.choice, self.calls), *call))
                self.calls += 1

    def _content(self, text: str, out: list[str | ToolCall]) -> None:
        if text and not (self.calls and text.isspace()):
            out.append(text)

    def flush(self) -> list[str | ToolCall]:
        rest, self.buffer = self.buffer, ""
        if self.bare:
            content, calls = read_calls(rest, self.names, self.response_id, self.choice)
            return calls or [rest]
        return [rest] if rest and not (self.calls and rest.isspace()) else []
