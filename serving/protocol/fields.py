"""What the OpenAI request models share: the strict base model, the shared field validators
(stop, seed, stream options) and the sampling fields an engine request takes."""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainValidator, model_validator
from pydantic_core import PydanticCustomError

from core.errors import MAX_ECHO, clip, json_type
from serving.defaults import SamplingDefaults
from serving.engines.base import GenerationRequest, SamplingParams
from serving.engines.structured import ResponseFormat

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_STOP = 4
MAX_UNKNOWN_REPORTED = 16  # `unknown_fields()` names at most this many, each at most 64 chars

ChatRole = Literal["system", "developer", "user", "assistant", "tool"]


def fail(param: str, message: str) -> PydanticCustomError:
    """A validation error that carries its own OpenAI `param` and finished message."""
    return PydanticCustomError("openai", "{message}", {"param": param, "message": message})


def wrong_type(param: str, expected: str, value: Any) -> PydanticCustomError:
    """`param` holds a value of the wrong JSON type; `expected` as a message says it."""
    return fail(param, f"Invalid type for '{param}': expected {expected}, but got "
                f"{json_type(value)} instead.")


def show(value: Any) -> str:
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

    @property
    def include_usage(self) -> bool:
        """A streamed answer ends with a usage chunk (`stream_options.include_usage`)."""
        options = getattr(self, "stream_options", None)
        return bool(getattr(self, "stream", False) and options is not None
                    and options.include_usage)

    def choices(self, request_id: str, defaults: SamplingDefaults | None,
                response_format: ResponseFormat | None, **inputs: Any) -> list[GenerationRequest]:
        """One `GenerationRequest` per choice of `n`, with `inputs` (the messages or prompt);
        choice i is seeded `seed + i`. A top_p of 0 keeps only the most likely token: greedy."""
        temperature, top_p = self.sampling_values(defaults)
        if top_p == 0.0:
            temperature, top_p = 0.0, 1.0
        return [GenerationRequest(
            request_id=request_id,
            params=SamplingParams(
                max_tokens=self.max_output_tokens, temperature=float(temperature),
                top_p=float(top_p), stop=self.stop, seed=_seed_for(self.seed, i),
                logprobs=self.logprobs_k, response_format=response_format),
            choice=i, **inputs) for i in range(self.n)]


# -- shared field validators -------------------------------------------------------------------


def parse_stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list):
        if len(value) > MAX_STOP:
            raise fail(
                "stop",
                f"Invalid 'stop': expected at most {MAX_STOP} stop sequences, but got "
                f"{len(value)} instead.",
            )
        for i, s in enumerate(value):
            if not isinstance(s, str):
                raise wrong_type(f"stop[{i}]", "a string", s)
        items = value
    else:
        raise wrong_type("stop", "a string or an array of strings", value)
    # An empty stop string would end every answer before it starts: it asks for nothing.
    return tuple(dict.fromkeys(s for s in items if s))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; we never obfuscate


def check_seed(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= INT64_MAX:
            raise fail(
                "seed",
                f"Invalid 'seed': expected an integer between {INT64_MIN} and {INT64_MAX} "
                f"(int64), but got {show(value)} instead.",
            )
    return value


def _seed_for(seed: int | None, i: int) -> int | None:
    """Choice i's seed: `seed + i` wrapped into int64, None when the client gave none."""
    if seed is None:
        return None
    return (seed + i - INT64_MIN) % 2**64 + INT64_MIN


# Field types shared by both requests, each with its own check.
Stop = Annotated[tuple[str, ...], PlainValidator(parse_stop)]
Seed = Annotated[int | None, BeforeValidator(check_seed)]
