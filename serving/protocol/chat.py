"""`ChatCompletionRequest`: `/v1/chat/completions` bodies, messages, content parts, tools
and tool calls, checked the OpenAI way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from serving.defaults import SamplingDefaults
from serving.engines.base import GenerationRequest, Message
from serving.engines.structured import FormatError, ResponseFormat, parse_response_format
from serving.engines.tools import ToolCall, ToolUse, parse_tools
from serving.protocol.fields import (
    MAX_TOKENS_LIMIT,
    ChatRole,
    OpenAIBaseModel,
    Seed,
    Stop,
    StreamOptions,
    fail,
    show,
    wrong_type,
)

# -- chat ---------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    """One validated input message: its text parts already joined."""

    model_config = ConfigDict(frozen=True)

    role: ChatRole
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _objects(items: list, where: str) -> Iterator[tuple[str, dict]]:
    """Each item of `items` with its parameter path (`where[i]`); a non-object is refused."""
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise wrong_type(f"{where}[{i}]", "an object", item)
        yield f"{where}[{i}]", item


def _parse_content(value: Any, role: str, where: str) -> str:
    if value is None:
        if role == "assistant":  # an assistant turn that only called tools, or refused
            return ""
        raise fail(
            f"{where}.content",
            f"Missing required parameter: '{where}.content' (a {role} message needs content).",
        )
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise wrong_type(f"{where}.content", "a string or an array of text parts", value)
    if not value:
        raise fail(f"{where}.content", f"Invalid '{where}.content': expected an array with at "
                   "least 1 content part, but got an empty array instead.")
    texts = []
    for at, part in _objects(value, f"{where}.content"):
        kind = part.get("type")
        field = "text"
        if kind == "refusal" and role == "assistant":
            field = "refusal"
        elif kind != "text":
            raise fail(f"{at}.type", f"Invalid value for '{at}.type': {show(kind)} content "
                       "parts are not supported by this server; only 'text' parts are.")
        text = part.get(field)
        if not isinstance(text, str):
            raise wrong_type(f"{at}.{field}", "a string", text)
        texts.append(text)
    return "\n".join(texts)


def _parse_messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list):
        raise wrong_type("messages", "an array of messages", value)
    if not value:
        raise fail("messages",
                   "Invalid 'messages': empty array. Expected an array with at least 1 message.")
    out = []
    for where, m in _objects(value, "messages"):
        role = m.get("role")
        if role not in _ROLES:
            if role is None:
                msg = f"Missing required parameter: '{where}.role'."
            else:
                msg = (
                    f"Invalid value for '{where}.role': {show(role)}. Supported roles are "
                    "'system', 'developer', 'user', 'assistant' and 'tool'."
                )
            raise fail(f"{where}.role", msg)
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise wrong_type(f"{where}.name", "a string", name)
        calls = _parse_tool_calls(m.get("tool_calls"), role, where)
        call_id = m.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            raise fail(f"{where}.tool_call_id", f"Missing required parameter: "
                        f"'{where}.tool_call_id' (a string: the id of the call it answers).")
        out.append(
            ChatMessage(role=role, content=_parse_content(m.get("content"), role, where),
                        name=name, tool_calls=calls,
                        tool_call_id=call_id if role == "tool" else None)
        )
    return out


def _parse_tool_calls(value: Any, role: str, where: str) -> tuple[ToolCall, ...]:
    """An assistant turn's `tool_calls`: `[{id, type: "function", function: {name, arguments}}]`."""
    if value is None:
        return ()
    at = f"{where}.tool_calls"
    if role != "assistant":
        raise fail(at, f"Invalid '{at}': only assistant messages carry tool calls.")
    if not isinstance(value, list):
        raise wrong_type(at, "an array", value)
    calls = []
    for k, c in enumerate(value):
        if isinstance(c, dict) and c.get("type") not in (None, "function"):
            raise fail(f"{at}[{k}].type", f"Invalid value for '{at}[{k}].type': "
                        f"{show(c.get('type'))}. Only 'function' tool calls are supported.")
        fn = c.get("function") if isinstance(c, dict) else None
        fields = (c.get("id"), fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else ()
        if not fields or not all(isinstance(x, str) for x in fields):
            raise fail(f"{at}[{k}]", f"Invalid '{at}[{k}]': expected {{\"id\": string, "
                        "\"type\": \"function\", \"function\": {\"name\": string, "
                        "\"arguments\": string}}.")
        calls.append(ToolCall(*fields))
    return tuple(calls)


def _check_functions(functions: Any, function_call: Any) -> None:
    """The legacy function-calling fields are refused, never ignored: `tools` replaces them."""
    if functions and function_call != "none":
        raise fail("functions", "Invalid 'functions': the legacy 'functions' and "
                    "'function_call' are not supported by this server; send the same functions "
                    "as 'tools' (each {\"type\": \"function\", \"function\": {...}}) and "
                    "'tool_choice' instead.")
    if function_call not in (None, "none") and not functions:
        raise fail("function_call", "Invalid 'function_call': it is only allowed when "
                    "'functions' are specified.")


class ChatCompletionRequest(OpenAIBaseModel):
    """POST /v1/chat/completions. Fields follow the order of OpenAI's API reference."""

    PROMPT_PARAM: ClassVar[str] = "messages"
    IGNORED: ClassVar[tuple[str, ...]] = tuple(
        """
        audio frequency_penalty logit_bias metadata modalities
        moderation prediction presence_penalty prompt_cache_key
        prompt_cache_options prompt_cache_retention reasoning_effort
        safety_identifier service_tier store verbosity web_search_options
        """.split()
    )

    # Honoured.
    messages: list[ChatMessage] = Field(min_length=1)
    model: str = Field(min_length=1)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # deprecated by OpenAI
    n: int = Field(1, ge=1, le=128)
    parallel_tool_calls: Any = None
    response_format: ResponseFormat | None = None
    seed: Seed = None
    stop: Stop = ()
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    tool_choice: Any = None
    tools: Any = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    user: str | None = None
    _tool_use: ToolUse | None = PrivateAttr(None)  # tools, tool_choice, parallel_tool_calls

    # Accepted and ignored (see IGNORED): loose types, checked only where OpenAI's range is simple.
    audio: Any = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    function_call: Any = None
    functions: Any = None
    logit_bias: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    modalities: Any = None
    moderation: Any = None
    prediction: Any = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    safety_identifier: Any = None
    service_tier: Any = None
    store: bool | None = None
    verbosity: Any = None
    web_search_options: Any = None

    @field_validator("messages", mode="plain")
    @classmethod
    def check_messages(cls, v: Any) -> list[ChatMessage]:
        return _parse_messages(v)

    @field_validator("response_format", mode="plain")
    @classmethod
    def check_response_format(cls, v: Any) -> ResponseFormat | None:
        try:
            return parse_response_format(v)
        except FormatError as e:
            raise fail(e.param, e.message) from None

    @model_validator(mode="after")
    def check_cross_field(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise fail(
                "stream_options",
                "Invalid 'stream_options': it is only allowed when 'stream' is true.",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise fail(
                "top_logprobs",
                "Invalid 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set.",
            )
        _check_functions(self.functions, self.function_call)
        try:
            self._tool_use = parse_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        except FormatError as e:
            raise fail(e.param, e.message) from None
        if self._tool_use is not None and self.response_format is not None:
            raise fail("response_format", "Invalid 'response_format': it cannot be combined "
                        "with 'tools' the model may call; set 'tool_choice' to 'none' or omit "
                        "one of them.")
        return self

    @property
    def tool_use(self) -> ToolUse | None:
        """The tools the model may call, and how; None: an answer in text."""
        return self._tool_use

    @property
    def max_output_tokens(self) -> int | None:
        """`max_completion_tokens`, else `max_tokens`; None: until the context window is full."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    @property
    def logprobs_k(self) -> int | None:
        """Alternatives per token for `SamplingParams.logprobs`; None: no logprobs."""
        if not self.logprobs:
            return None
        return self.top_logprobs if self.top_logprobs is not None else 0

    def engine_messages(self) -> tuple[Message, ...]:
        return tuple(
            Message("system" if m.role == "developer" else m.role, m.content, m.tool_calls,
                    m.tool_call_id)
            for m in self.messages
        )

    def to_generation_requests(
        self, request_id: str, defaults: SamplingDefaults | None = None,
        constraint: ResponseFormat | None = None,
    ) -> list[GenerationRequest]:
        use = self.tool_use
        fmt = constraint or self.response_format or (use.format() if use else None)
        return self.choices(request_id, defaults, fmt, messages=self.engine_messages(),
                            tools=use)
