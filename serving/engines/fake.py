"""A deterministic engine with no model: for tests and overhead benchmarks.

Text is drawn from a fixed word list by a PRNG seeded from the request, one word per token
(the token id is the word's index in `WORDS`), at a set pace (`ttft_s`, then `token_delay_s`
between tokens). The same request always gives the same text: at temperature 0 the text depends
on the prompt only; above 0 on the prompt and `seed` (or the request id and choice index when
`seed` is None).

Prompt tokens are the whitespace-separated words of the prompt; chat messages are first rendered
as ChatML. Logprobs are fake but well formed: the chosen token first, alternatives below it.
A `response_format` or `tools` is refused (`Unsupported`): words drawn at random cannot honour a schema.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import AsyncIterator, Sequence

from serving.engines.base import (
    Delta,
    Engine,
    EngineInfo,
    GenerationRequest,
    Message,
    StopMatcher,
    TokenLogprob,
    Unsupported,
)
from serving.engines.config import FakeEngine as FakeEngineConfig

WORDS: tuple[str, ...] = tuple(
    "the a model answer student teacher token quick brown fox jumps over lazy dog light "
    "river stone cloud paper signal route shadow score data loop value system request reply "
    "small large green blue red yellow north south east west early late open close read write "
    "fast slow bright dark first last near far always never maybe often again together".split()
)


def render_chatml(messages: Sequence[Message]) -> str:
    """Messages as ChatML text, ending with the opened assistant turn."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def count_prompt_tokens(text: str) -> int:
    return len(text.split())


def _rng(*parts: object) -> random.Random:
    """A PRNG seeded by a stable hash of `parts` (Python's `hash` changes between processes)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _token_text(word_id: int, position: int) -> str:
    return WORDS[word_id] if position == 0 else " " + WORDS[word_id]


def _fake_logprob(rng: random.Random, word_id: int, position: int, k: int) -> TokenLogprob:
    """The chosen token is the most likely; `k` alternatives follow in decreasing order."""
    chosen = -round(0.01 + 0.5 * rng.random(), 4)
    others = [i for i in rng.sample(range(len(WORDS)), min(k + 1, len(WORDS))) if i != word_id]
    top = [(_token_text(word_id, position), chosen)]
    lp = math.log(max(1e-9, 1.0 - math.exp(chosen)) / 2)  # the runner-up holds half the rest
    for i in others[: max(0, k - 1)]:
        top.append((_token_text(i, position), round(lp, 4)))
        lp -= 0.5 + rng.random()
    return TokenLogprob(_token_text(word_id, position), chosen, tuple(top[:k]))


class FakeEngine(Engine):
    def __init__(self, config: FakeEngineConfig):
        self.config = config
        self.info = EngineInfo(
            model="fake",
            context_window=config.context_window,
            supports_logprobs=True,
            max_concurrency=config.max_concurrency,
        )
        self._slots = asyncio.Semaphore(config.max_concurrency)

    async def start(self) -> None:
        """Nothing to load."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        prompt = (
            render_chatml(request.messages) if request.messages is not None else request.prompt
        )
        if prompt is None:
            raise ValueError("GenerationRequest needs `messages` or `prompt`")
        p = request.params
        if request.tools is not None:
            raise Unsupported("tools", "Invalid 'tools': this model (the fake engine, which has "
                              "no vocabulary to constrain) cannot call tools; omit 'tools' or "
                              "set 'tool_choice' to 'none'.")
        if p.response_format is not None:
            raise Unsupported("response_format", "Invalid 'response_format': this model (the "
                              "fake engine, which has no vocabulary to constrain) answers in "
                              "free text only; omit 'response_format'.")
        prompt_tokens = count_prompt_tokens(prompt)
        budget = self.budget(prompt_tokens, p.max_tokens)  # raises PromptTooLong here, eagerly
        if p.temperature == 0:
            rng = _rng("greedy", prompt)
        else:
            unseeded = f"id:{request.request_id}:{request.choice}"
            rng = _rng(p.seed if p.seed is not None else unseeded, prompt)
        return self._stream(request, prompt_tokens, budget, rng)

    async def _stream(
        self, request: GenerationRequest, prompt_tokens: int, budget: int, rng: random.Random
    ) -> AsyncIterator[Delta]:
        p = request.params
        n = min(self.config.completion_tokens, budget)
        finish = "length" if budget < self.config.completion_tokens else "stop"
        lp_rng = random.Random(rng.random())  # separate stream: logprobs do not change the text
        matcher = StopMatcher(p.stop)
        async with self._slots:
            if self.config.ttft_s:
                await asyncio.sleep(self.config.ttft_s)
            if n == 0:
                yield Delta("", finish_reason=finish, prompt_tokens=prompt_tokens,
                            completion_tokens=0)
                return
            for pos in range(n):
                if pos and self.config.token_delay_s:
                    await asyncio.sleep(self.config.token_delay_s)
                word_id = rng.randrange(len(WORDS))
                text, stopped = matcher.push(_token_text(word_id, pos))
                logprobs = None
                if p.logprobs is not None:
                    logprobs = (_fake_logprob(lp_rng, word_id, pos, p.logprobs),)
                last = stopped or pos == n - 1
                if not last:
                    yield Delta(text, (word_id,), logprobs)
                    continue
                if not stopped:
                    text += matcher.flush()
                yield Delta(
                    text,
                    (word_id,),
                    logprobs,
                    finish_reason="stop" if stopped else finish,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=pos + 1,
                )
                return
