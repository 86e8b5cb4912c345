"""`CompletionRequest`: legacy `/v1/completions` bodies, one string prompt each."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from serving.defaults import SamplingDefaults
from serving.engines.base import GenerationRequest
from serving.engines.structured import ResponseFormat
from serving.protocol.fields import (
    MAX_TOKENS_LIMIT,
    OpenAIBaseModel,
    Seed,
    Stop,
    StreamOptions,
    fail,
    wrong_type,
)

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
        raise fail(
            "prompt",
            f"Invalid 'prompt': this server supports only one string prompt per request (a "
            f"string, or an array holding exactly one string), but got {got} instead. Send one "
            "request per prompt.",
        )
    raise wrong_type("prompt", "a string", value)


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
            raise fail(
                "echo",
                "Invalid 'echo': echoing the prompt is not supported by this server; omit "
                "'echo' or set it to false.",
            )
        if self.best_of is not None and self.best_of != self.n:
            raise fail(
                "best_of",
                f"Invalid 'best_of': {self.best_of}. This server does not rank candidates; omit "
                "'best_of' or set it equal to 'n'.",
            )
        if self.stream_options is not None and not self.stream:
            raise fail(
                "stream_options",
                "Invalid 'stream_options': it is only allowed when 'stream' is true.",
            )
        return self

    @property
    def max_output_tokens(self) -> int:
        return self.max_tokens

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
        return self.choices(request_id, defaults, constraint, prompt=self.prompt)
