"""Answers from any model the gateway can serve, outside Ray.

The quantize report and the validation gate run students and teachers through the same engines
(`serving.engines`) that serve them in production, so what they measure is what users get.
Owns: naming a model by a string (`engine_config_for`), running an engine for a while
(`open_engine`) and answering prompts with timings (`answer_one`, `answer_all`). Does not own
what the answers are scored against (`distill.fidelity`, the gate).

A model string is one of:
- a `.gguf` file                      -> the `llamacpp` engine
- a Hugging Face model folder         -> the `transformers` engine
- `http(s)://host/v1#MODEL`           -> the `remote` engine (an OpenAI-compatible server; the
                                         bearer key from `$PROTEGE_REMOTE_API_KEY`; none when unset)
- `fake`                              -> the deterministic `fake` engine (tests)
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.engines import (
    Engine,
    GenerationRequest,
    Message,
    ResponseFormat,
    SamplingParams,
    ToolUse,
    Unsupported,
    build_engine,
)
from serving.engines.config import (
    EngineConfig,
    FakeEngine,
    LlamaCppEngine,
    RemoteEngine,
    TransformersEngine,
)
from serving.engines.remote import UpstreamError

Prompt = str | Sequence[dict[str, str]]  # a user message, or chat messages ending before the answer
REMOTE_KEY_ENV = "PROTEGE_REMOTE_API_KEY"


@dataclass(frozen=True, slots=True)
class Answer:
    """One greedy (or sampled) answer with its timings."""

    text: str
    token_logprobs: tuple[float, ...]  # the chosen tokens' logprobs; () when not asked / not had
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    ttft_s: float | None  # None when no token came
    latency_s: float

    @property
    def inter_token_s(self) -> float | None:
        """Mean time between tokens after the first (None with fewer than two tokens)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.completion_tokens - 1)


def engine_config_for(model: str, *, n_ctx: int = 2048, n_threads: int | None = None) -> EngineConfig:
    """The engine config that runs `model` (see the module docstring); ValueError if unknown."""
    if model == "fake":
        return FakeEngine()
    if model.startswith(("http://", "https://")):
        url, _, name = model.partition("#")
        if not name:
            raise ValueError(f"{model!r}: name the remote model after '#', e.g. "
                             "http://127.0.0.1:8000/v1#teacher")
        keyed = bool(os.environ.get(REMOTE_KEY_ENV))  # no key set: an endpoint without auth
        return RemoteEngine(base_url=url, model=name, api_key_env=REMOTE_KEY_ENV if keyed else None)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return LlamaCppEngine(path=str(path.resolve()), n_ctx=n_ctx, n_threads=n_threads)
    if path.is_dir() and (path / "config.json").is_file():
        return TransformersEngine(model=str(path.resolve()))
    if not path.exists():
        raise ValueError(f"{model}: no such file or folder")
    raise ValueError(f"{model}: not a .gguf file, a model folder with config.json, or an "
                     "http(s)://.../v1#MODEL address")


@asynccontextmanager
async def open_engine(model: str | EngineConfig, **options: Any) -> AsyncIterator[Engine]:
    """A started engine for `model` (a model string or an engine config), closed on exit."""
    config = engine_config_for(model, **options) if isinstance(model, str) else model
    engine = build_engine(config, lambda p: Path(p).expanduser().resolve())
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def chat_messages(prompt: Prompt) -> tuple[Message, ...]:
    """The engine's messages for `prompt`: a string is one user message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tuple(Message(m["role"], m["content"]) for m in messages)


def request_for(prompt: Prompt, *, max_tokens: int, temperature: float = 0.0, seed: int = 0,
                logprobs: bool = False, response_format: ResponseFormat | None = None,
                tools: ToolUse | None = None) -> GenerationRequest:
    """A chat request for `prompt`: a string is one user message. A `response_format` or
    `tools` constrain the answer as they do a client's request."""
    fmt = response_format or (tools.format() if tools is not None else None)
    return GenerationRequest(
        request_id=f"distill-{uuid.uuid4().hex[:12]}",
        params=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                              logprobs=0 if logprobs else None, response_format=fmt),
        messages=chat_messages(prompt),
        tools=tools,
    )


async def answer_one(engine: Engine, prompt: Prompt, *, max_tokens: int,
                     temperature: float = 0.0, seed: int = 0, logprobs: bool = False,
                     response_format: ResponseFormat | None = None,
                     tools: ToolUse | None = None) -> Answer:
    """Generate one answer to `prompt`, timing the first token and the whole answer. A model
    that refuses the `response_format` or `tools` (an engine that cannot constrain, an endpoint
    answering 400) gives an empty answer whose `finish_reason` says so: it fails that case."""
    request = request_for(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                          logprobs=logprobs, response_format=response_format, tools=tools)
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    lps: list[float] = []
    last = None
    try:
        async for delta in engine.generate(request):
            if first is None and (delta.text or delta.token_ids):
                first = time.perf_counter()
            text.append(delta.text)
            if delta.logprobs:
                lps.extend(lp.logprob for lp in delta.logprobs)
            last = delta
    except (Unsupported, UpstreamError) as e:
        status = getattr(e, "status", 400)
        if request.params.response_format is None or status != 400:
            raise
        why = e.message if isinstance(e, Unsupported) else e.detail
        return Answer(text="", token_logprobs=(), prompt_tokens=0, completion_tokens=0,
                      finish_reason=f"refused: {why[:200]}", ttft_s=None,
                      latency_s=time.perf_counter() - started)
    done = time.perf_counter()
    return Answer(
        text="".join(text), token_logprobs=tuple(lps),
        prompt_tokens=(last.prompt_tokens or 0) if last else 0,
        completion_tokens=(last.completion_tokens or 0) if last else 0,
        finish_reason=last.finish_reason if last else None,
        ttft_s=None if first is None else first - started, latency_s=done - started)


async def answer_many(engine: Engine, prompts: Sequence[Prompt], *, max_tokens: int,
                      concurrency: int = 1, logprobs: bool = False,
                      temperature: float = 0.0, seed: int = 0) -> list[Answer]:
    """Answers to `prompts` in order, at most `concurrency` in flight at once."""
    slots = asyncio.Semaphore(max(1, concurrency))

    async def one(p: Prompt) -> Answer:
        async with slots:
            return await answer_one(engine, p, max_tokens=max_tokens, temperature=temperature,
                                    seed=seed, logprobs=logprobs)

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def answer_all(model: str | EngineConfig, prompts: Sequence[Prompt], *, max_tokens: int,
               concurrency: int = 1, logprobs: bool = False, **options: Any) -> list[Answer]:
    """Load `model`, answer `prompts` greedily, unload it (a blocking call for scripts)."""

    async def run() -> list[Answer]:
        async with open_engine(model, **options) as engine:
            return await answer_many(engine, prompts, max_tokens=max_tokens,
                                     concurrency=concurrency, logprobs=logprobs)

    return asyncio.run(run())
