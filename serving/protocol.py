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

Owns no I/O, no clock and no knowledge of routes, engines or response shapes.
"""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.errors import MAX_ECHO, OpenAIError, clip, json_type
from serving.defaults import SamplingDefaults
from serving.engines.base import GenerationRequest, Message, SamplingParams
from serving.engines.structured import FormatError, ResponseFormat, parse_response_format
from serving.engines.tools import ToolCall, ToolUse, parse_tools

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_STOP = 4
MAX_UNKNOWN_REPORTED = 16  # `unknown_fields()` names at most this many, each at most 64 chars

ChatRole = Literal["system", "developer", "user", "assistant", "tool"]


def _fail(param: str, message: str) -> PydanticCustomError:
    """A validation error that carries its own OpenAI `param` and finished message."""
    return PydanticCustomError("openai", "{message}", {"param": param, "message": message})


def _show(value: Any) -> str:
    """A client value quoted in a message: JSON, bounded."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return clip(text, MAX_ECHO)


def _is_int(annotation: Any) -> bool:
    """`int`, `int | None`, `Optional[int]`; not `Any`, not `float`."""
    if annotation is int:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return int in get_args(annotation)
    return False


def _integral_float(value: Any) -> bool:
    """A JSON number with no fraction that a client wrote as a float (`16.0`, `1e3`)."""
    return type(value) is float and value.is_integer()


def _is_noop(value: Any) -> bool:
    """True for values of an ignored field that ask for nothing (0 penalty, store=false, ...)."""
    return value is None or value is False or value == 0 or value in ({}, [], {"type": "text"})


class OpenAIBaseModel(BaseModel):
    """Base of the request models: strict types, unknown fields accepted and reported."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    # Known OpenAI fields accepted but not acted on; see `ignored_fields`.
    IGNORED: ClassVar[tuple[str, ...]] = ()
    # The field a prompt-too-long error points at.
    PROMPT_PARAM: ClassVar[str] = ""
    # Fields typed `int` (or `int | None`); set for each subclass.
    _INTEGERS: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._INTEGERS = frozenset(n for n, f in cls.model_fields.items() if _is_int(f.annotation))

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        """`null` means absent; `16.0` in an integer field means 16."""
        if isinstance(data, dict):
            return {
                k: int(v) if k in cls._INTEGERS and _integral_float(v) else v
                for k, v in data.items()
                if v is not None
            }
        return data

    def unknown_fields(self) -> tuple[str, ...]:
        """Names of the fields the client sent that OpenAI's API does not define (bounded)."""
        names = sorted(self.model_extra or ())[:MAX_UNKNOWN_REPORTED]
        return tuple(clip(n, 64) for n in names)

    def ignored_fields(self) -> tuple[str, ...]:
        """Known OpenAI fields sent with a value we do not honour (e.g. `logit_bias`)."""
        return tuple(f for f in self.IGNORED if not _is_noop(getattr(self, f)))

    def sampling_values(self, defaults: SamplingDefaults | None) -> tuple[float, float]:
        """temperature and top_p: as sent, else the serving variant's defaults."""
        d = defaults or SamplingDefaults()
        sent = self.model_fields_set
        return (self.temperature if "temperature" in sent else d.temperature,
                self.top_p if "top_p" in sent else d.top_p)


# -- shared field validators -------------------------------------------------------------------


def _parse_stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list):
        if len(value) > MAX_STOP:
            raise _fail(
                "stop",
                f"Invalid 'stop': expected at most {MAX_STOP} stop sequences, but got "
                f"{len(value)} instead.",
            )
        for i, s in enumerate(value):
            if not isinstance(s, str):
                raise _fail(
                    f"stop[{i}]",
                    f"Invalid type for 'stop[{i}]': expected a string, but got "
                    f"{json_type(s)} instead.",
                )
        items = value
    else:
        raise _fail(
            "stop",
            "Invalid type for 'stop': expected a string or an array of strings, but got "
            f"{json_type(value)} instead.",
        )
    # An empty stop string would end every answer before it starts: it asks for nothing.
    return tuple(dict.fromkeys(s for s in items if s))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; we never obfuscate


def _check_seed(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            raise _fail(
                "seed",
                f"Invalid 'seed': expected an integer between {INT64_MIN} and {INT64_MAX} "
                f"(int64), but got {_show(value)} instead.",
            )
    return value


def _seed_for(seed: int | None, i: int) -> int | None:
    """Choice i's seed: `seed + i` wrapped into int64, None when the client gave none."""
    if seed is None:
        return None
    return (seed + i - INT64_MIN) % 2**64 + INT64_MIN


def _sampling(
    *,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    stop: tuple[str, ...],
    seed: int | None,
    logprobs: int | None,
    i: int,
    response_format: ResponseFormat | None = None,
) -> SamplingParams:
    if top_p == 0.0:  # nucleus of mass 0 keeps only the most likely token: greedy
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        stop=stop,
        seed=_seed_for(seed, i),
        logprobs=logprobs,
        response_format=response_format,
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


def _parse_content(value: Any, role: str, where: str) -> str:
    if value is None:
        if role == "assistant":  # an assistant turn that only called tools, or refused
            return ""
        raise _fail(
            f"{where}.content",
            f"Missing required parameter: '{where}.content' (a {role} message needs content).",
        )
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _fail(
            f"{where}.content",
            f"Invalid type for '{where}.content': expected a string or an array of text parts, "
            f"but got {json_type(value)} instead.",
        )
    if not value:
        raise _fail(
            f"{where}.content",
            f"Invalid '{where}.content': expected an array with at least 1 content part, but got "
            "an empty array instead.",
        )
    texts = []
    for j, part in enumerate(value):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _fail(
                at,
                f"Invalid type for '{at}': expected an object, but got {json_type(part)} instead.",
            )
        kind = part.get("type")
        field = "text"
        if kind == "refusal" and role == "assistant":
            field = "refusal"
        elif kind != "text":
            raise _fail(
                f"{at}.type",
                f"Invalid value for '{at}.type': {_show(kind)} content parts are not supported "
                "by this server; only 'text' parts are.",
            )
        text = part.get(field)
        if not isinstance(text, str):
            raise _fail(
                f"{at}.{field}",
                f"Invalid type for '{at}.{field}': expected a string, but got "
                f"{json_type(text)} instead.",
            )
        texts.append(text)
    return "\n".join(texts)


def _parse_messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list):
        raise _fail(
            "messages",
            f"Invalid type for 'messages': expected an array of messages, but got "
            f"{json_type(value)} instead.",
        )
    if not value:
        raise _fail(
            "messages",
            "Invalid 'messages': empty array. Expected an array with at least 1 message.",
        )
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _fail(
                where,
                f"Invalid type for '{where}': expected an object, but got {json_type(m)} instead.",
            )
        role = m.get("role")
        if role not in _ROLES:
            if role is None:
                msg = f"Missing required parameter: '{where}.role'."
            else:
                msg = (
                    f"Invalid value for '{where}.role': {_show(role)}. Supported roles are "
                    "'system', 'developer', 'user', 'assistant' and 'tool'."
                )
            raise _fail(f"{where}.role", msg)
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise _fail(
                f"{where}.name",
                f"Invalid type for '{where}.name': expected a string, but got "
                f"{json_type(name)} instead.",
            )
        calls = _parse_tool_calls(m.get("tool_calls"), role, where)
        call_id = m.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            raise _fail(f"{where}.tool_call_id", f"Missing required parameter: "
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
        raise _fail(at, f"Invalid '{at}': only assistant messages carry tool calls.")
    if not isinstance(value, list):
        raise _fail(at, f"Invalid type for '{at}': expected an array, but got "
                    f"{json_type(value)} instead.")
    calls = []
    for k, c in enumerate(value):
        if isinstance(c, dict) and c.get("type") not in (None, "function"):
            raise _fail(f"{at}[{k}].type", f"Invalid value for '{at}[{k}].type': "
                        f"{_show(c.get('type'))}. Only 'function' tool calls are supported.")
        fn = c.get("function") if isinstance(c, dict) else None
        fields = (c.get("id"), fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else ()
        if not fields or not all(isinstance(x, str) for x in fields):
            raise _fail(f"{at}[{k}]", f"Invalid '{at}[{k}]': expected {{\"id\": string, "
                        "\"type\": \"function\", \"function\": {\"name\": string, "
                        "\"arguments\": string}}.")
        calls.append(ToolCall(*fields))
    return tuple(calls)


def _check_functions(functions: Any, function_call: Any) -> None:
    """The legacy function-calling fields are refused, never ignored: `tools` replaces them."""
    if functions and function_call != "none":
        raise _fail("functions", "Invalid 'functions': the legacy 'functions' and "
                    "'function_call' are not supported by this server; send the same functions "
                    "as 'tools' (each {\"type\": \"function\", \"function\": {...}}) and "
                    "'tool_choice' instead.")
    if function_call not in (None, "none") and not functions:
        raise _fail("function_call", "Invalid 'function_call': it is only allowed when "
                    "'functions' are specified.")


# Field types shared by both requests, each with its own check.
Stop = Annotated[tuple[str, ...], PlainValidator(_parse_stop)]
Seed = Annotated[int | None, BeforeValidator(_check_seed)]


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
            raise _fail(e.param, e.message) from None

    @model_validator(mode="after")
    def check_cross_field(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise _fail(
                "stream_options",
                "Invalid 'stream_options': it is only allowed when 'stream' is true.",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise _fail(
                "top_logprobs",
                "Invalid 'top_logprobs': 'logprobs' must be true when 'top_logprobs' is set.",
            )
        _check_functions(self.functions, self.function_call)
        try:
            self._tool_use = parse_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        except FormatError as e:
            raise _fail(e.param, e.message) from None
        if self._tool_use is not None and self.response_format is not None:
            raise _fail("response_format", "Invalid 'response_format': it cannot be combined "
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
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

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
        messages = self.engine_messages()
        temperature, top_p = self.sampling_values(defaults)
        use = self.tool_use
        fmt = constraint or self.response_format or (use.format() if use else None)
        return [
            GenerationRequest(
                request_id=request_id,
                params=_sampling(
                    max_tokens=self.max_output_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop=self.stop,
                    seed=self.seed,
                    logprobs=self.logprobs_k,
                    i=i,
                    response_format=fmt,
                ),
                messages=messages,
                choice=i,
                tools=use,
            )
            for i in range(self.n)
        ]


# -- completions --------------------------------------------------------------------------------


def _parse_prompt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list):
        got = "an empty array" if not value else f"an array of {len(value)} items"
        if value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            got = "an array of token ids"
        elif value and isinstance(value[0], list):
            got = "an array of token arrays"
        elif value and isinstance(value[0], str):
            got = f"an array of {len(value)} strings"
        raise _fail(
            "prompt",
            f"Invalid 'prompt': this server supports only one string prompt per request (a "
            f"string, or an array holding exactly one string), but got {got} instead. Send one "
            "request per prompt.",
        )
    raise _fail(
        "prompt",
        f"Invalid type for 'prompt': expected a string, but got {json_type(value)} instead.",
    )


class CompletionRequest(OpenAIBaseModel):
    """POST /v1/completions (legacy). Fields follow the order of OpenAI's API reference."""

    PROMPT_PARAM: ClassVar[str] = "prompt"
    IGNORED: ClassVar[tuple[str, ...]] = (
        "frequency_penalty",
        "logit_bias",
        "presence_penalty",
        "suffix",
    )

    model: str = Field(min_length=1)
    prompt: str
    best_of: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # ignored
    logit_bias: dict[str, Any] | None = None  # ignored
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # ignored
    seed: Seed = None
    stop: Stop = ()
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None  # ignored
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    user: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def check_prompt(cls, v: Any) -> str:
        return _parse_prompt(v)

    @model_validator(mode="after")
    def check_cross_field(self) -> CompletionRequest:
        if self.echo:
            raise _fail(
                "echo",
                "Invalid 'echo': echoing the prompt is not supported by this server; omit "
                "'echo' or set it to false.",
            )
        if self.best_of is not None and self.best_of != self.n:
            raise _fail(
                "best_of",
                f"Invalid 'best_of': {self.best_of}. This server does not rank candidates; omit "
                "'best_of' or set it equal to 'n'.",
            )
        if self.stream_options is not None and not self.stream:
            raise _fail(
                "stream_options",
                "Invalid 'stream_options': it is only allowed when 'stream' is true.",
            )
        return self

    @property
    def max_output_tokens(self) -> int:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs

    def to_generation_requests(
        self, request_id: str, defaults: SamplingDefaults | None = None,
        constraint: ResponseFormat | None = None,
    ) -> list[GenerationRequest]:
        temperature, top_p = self.sampling_values(defaults)
        return [
            GenerationRequest(
                request_id=request_id,
                params=_sampling(
                    max_tokens=self.max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop=self.stop,
                    seed=self.seed,
                    logprobs=self.logprobs,
                    i=i,
                    response_format=constraint,
                ),
                prompt=self.prompt,
                choice=i,
            )
            for i in range(self.n)
        ]


def unknown_fields(request: OpenAIBaseModel) -> tuple[str, ...]:
    """`request.unknown_fields()`, as a function."""
    return request.unknown_fields()


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
            f"{_show(value)} instead.",
        )
    if kind == "finite_number":
        return OpenAIError.invalid_value(
            param, f"Invalid '{param}': expected a finite number, but got {_show(value)} instead."
        )
    if kind in ("string_too_short", "string_too_long"):
        edge = "at least" if kind == "string_too_short" else "at most"
        limit = ctx.get("min_length" if kind == "string_too_short" else "max_length")
        unit = "character" if limit == 1 else "characters"
        return OpenAIError.invalid_value(
            param,
            f"Invalid '{param}': expected a string of {edge} {limit} {unit}, but got "
            f"{_show(value)} instead.",
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
    return OpenAIError.invalid_value(param, f"Invalid '{param}': {msg}; got {_show(value)}.")


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
