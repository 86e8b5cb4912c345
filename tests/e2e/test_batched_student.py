"""The packaged SmolLM2 student decoded with continuous batching answers exactly as it does one
sequence at a time: eight greedy generations sent together to `n_parallel: 8`, token for token
the same as through `n_parallel: 1` (llama.cpp in process, n_threads 1 as the default config)."""

from __future__ import annotations

import asyncio

import pytest

from serving.engines import GenerationRequest, Message, SamplingParams, build_engine, merge_deltas
from serving.engines.config import LlamaCppEngine
from tests.e2e.test_packaged_student import STUDENT

pytestmark = pytest.mark.e2e

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a ten-year-old, step by step.",
    "Describe a walk through a busy market in the morning.",
    "List ten ideas for a weekend trip and explain each one briefly.",
)


async def answers(n_parallel: int) -> tuple[list[tuple[int, ...]], int]:
    engine = build_engine(LlamaCppEngine(path=str(STUDENT), n_threads=1, n_parallel=n_parallel),
                          resolve_path=lambda p: p)
    await engine.start()

    async def one(i: int) -> tuple[int, ...]:
        request = GenerationRequest(str(i), SamplingParams(48, temperature=0),
                                    messages=(Message("user", PROMPTS[i % len(PROMPTS)]),))
        return merge_deltas([d async for d in engine.generate(request)]).token_ids

    try:
        return list(await asyncio.gather(*(one(i) for i in range(8)))), engine.batcher.widest
    finally:
        await engine.close()


def test_batched_greedy_answers_are_token_identical():
    alone, widest_alone = asyncio.run(answers(1))
    together, widest = asyncio.run(answers(8))
    assert (widest_alone, widest) == (1, 8)
    assert all(len(a) == 48 for a in alone)
    assert together == alone
