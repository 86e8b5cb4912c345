"""The one async interface every engine implements.

An engine owns a loaded model, its tokenizer and its chat template. It takes one
`GenerationRequest` (one choice; the caller fans out `n`) and yields `Delta`s: text with the
token ids and logprobs when the engine has them. The last delta carries `finish_reason` and the
token counts. Closing the iterator early (client gone, timeout) aborts the generation.

Engines know nothing of HTTP, OpenAI response shapes, routes, Ray or shadowing.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from serving.engines.structured import ResponseFormat
from serving.engines.tools import ToolCall, ToolUse

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


@dataclass(frozen=True, slots=True)
class SamplingParams:
    # None: until the context window is full (the engine resolves it from the prompt length).
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # None: no logprobs. k >= 0: the chosen token's logprob plus the k most likely alternatives.
    logprobs: int | None = None
    # None: free text. Else the answer must conform (`serving.engines.structured`): constrained
    # decoding.
    response_format: ResponseFormat | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One choice to generate: exactly one of `messages` (chat) or `prompt` (completion).

    `choice` is its index among the request's `n`: choices share `request_id`, and unseeded
    sampling must still tell them apart. `tools` are the functions the model may call (chat
    only; `serving.engines.tools` writes them into the prompt, and `params.response_format` is
    then their call format)."""

    request_id: str
    params: SamplingParams
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    choice: int = 0
    tools: ToolUse | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(slots=True)
class Delta:
    """A piece of one choice's output. Only the last delta has `finish_reason` and counts."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model_version: str | None = None  # set by the serving replica on a choice's first delta
    # A label-constrained answer asked with logprobs: P(label | prompt) over the labels, from
    # each label's sequence logprob (last delta only; engines with token probabilities).
    label_probs: dict[str, float] | None = None
    # The backend ended without saying why (a remote stream's [DONE] with no finish_reason):
    # `finish_reason` is "stop" by assumption, and the replica counts it (last delta only).
    finish_assumed: bool = False


@dataclass(frozen=True, slots=True)
class AnswerScores:
    """A given answer's tokens scored teacher-forced after a prompt (`Engine.score`): per token,
    its log-probability and the log-probability and id of the model's most likely token there."""

    tokens: np.ndarray  # [T] int64, the answer's token ids
    logprob: np.ndarray  # [T] float64, log P(token | prompt, answer so far)
    top_logprob: np.ndarray  # [T] float64, the best token's log-probability
    top_token: np.ndarray  # [T] int64, the best token's id

    @classmethod
    def of(cls, logits: np.ndarray, tokens: Sequence[int]) -> AnswerScores:
        """Scores from the logits rows that predict each of `tokens` (row t predicts token t)."""
        x = np.asarray(logits, dtype=np.float64).reshape(len(tokens), -1)
        x = x - x.max(axis=-1, keepdims=True)
        logprobs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
        ids = np.asarray(tokens, dtype=np.int64)
        best = logprobs.argmax(axis=-1) if len(ids) else np.zeros(0, dtype=np.int64)
        rows = np.arange(len(ids))
        return cls(ids, logprobs[rows, ids], logprobs[rows, best], best.astype(np.int64))

    @classmethod
    def join(cls, parts: Sequence[AnswerScores]) -> AnswerScores:
        if not parts:
            ints, floats = np.zeros(0, dtype=np.int64), np.zeros(0)
            return cls(ints, floats, floats, ints)
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("tokens", "logprob", "top_logprob", "top_token")))

    @property
    def total(self) -> float:
        """log P(answer | prompt)."""
        return float(self.logprob.sum())

    @property
    def confidence(self) -> np.ndarray:
        """The most likely token's probability at each position."""
        return np.exp(self.top_logprob)

    @property
    def correct(self) -> np.ndarray:
        """Whether the most likely token at each position is the answer's."""
        return self.top_token == self.tokens


class PromptTooLong(ValueError):
    """The prompt plus `max_tokens` does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_window: int):
        self.prompt_tokens, self.max_tokens, self.context_window = (
            prompt_tokens,
            max_tokens,
            context_window,
        )
        super().__init__(
            f"This model's maximum context length is {context_window} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or max_tokens."
        )

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (PromptTooLong, (self.prompt_tokens, self.max_tokens, self.context_window))


class Unsupported(ValueError):
    """This engine cannot honour a request field (`param`); the client gets a 400 naming it."""

    def __init__(self, param: str, message: str):
        self.param, self.message = param, message
        super().__init__(message)

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (Unsupported, (self.param, self.message))


class EngineError(RuntimeError):
    """The engine failed for a reason that is not the client's fault."""


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model: str  # what the engine serves, e.g. a file name or remote model id
    context_window: int | None  # None when the engine cannot tell (remote)
    supports_logprobs: bool
    max_concurrency: int = 1  # how many generations the engine runs at once


class Engine(abc.ABC):
    """A loaded model that generates text. Subclasses implement `start`, `generate`, `close`."""

    info: EngineInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model. Called once before the first `generate`."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Yield deltas for one choice. Raises `PromptTooLong` before the first delta."""

    async def score(self, messages: Sequence[Message], answer: str, *,
                    end: bool = False) -> AnswerScores:
        """Score `answer` (tokenized on its own, then end-of-sequence when `end`) as this model's
        reply to chat `messages`, teacher-forced. Raises `PromptTooLong` when the two do not fit
        the context window, `Unsupported` for an engine without token probabilities."""
        raise Unsupported("score", f"{self.info.model}: this engine cannot score tokens")

    async def close(self) -> None:
        """Free the model. Default: nothing to free."""

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The completion-token budget; raises `PromptTooLong` when the request cannot fit."""
        window = self.info.context_window
        if window is None:
            return max_tokens if max_tokens is not None else 2**31 - 1
        if max_tokens is None:
            if prompt_tokens >= window:
                raise PromptTooLong(prompt_tokens, 1, window)
            return window - prompt_tokens
        if prompt_tokens + max_tokens > window:
            raise PromptTooLong(prompt_tokens, max_tokens, window)
        return max_tokens


def merge_deltas(deltas: Iterable[Delta]) -> Delta:
    """Fold one choice's deltas into a single delta holding the whole answer."""
    text: list[str] = []
    ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    last = Delta("")
    version = None
    for d in deltas:
        version = version or d.model_version
        text.append(d.text)
        ids.extend(d.token_ids)
        if d.logprobs is not None:
            logprobs = (logprobs or []) + list(d.logprobs)
        last = d
    return Delta(
        "".join(text),
        tuple(ids),
        tuple(logprobs) if logprobs is not None else None,
        last.finish_reason,
        last.prompt_tokens,
        last.completion_tokens,
        version,
        last.label_probs,
    )


@dataclass(slots=True)
class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a possible partial match.

    Feed each new piece of text to `push`; it returns the text that is safe to emit and whether a
    stop string was hit. Call `flush` at the end to release what was held back.
    """

    stops: Sequence[str]
    _held: str = field(default="")

    def push(self, text: str) -> tuple[str, bool]:
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
