"""`protege eval`: score a model on the task suite, in-process or over HTTP.

A model is anything `distill.answers` can run: a `.gguf` file (llama.cpp), a Hugging Face
folder (transformers), or an OpenAI-compatible endpoint (`http(s)://host/v1`, our gateway
included; `#MODEL` picks the model, else the endpoint's first listed model). Answers are
greedy, one per case with the case's own token budget and conditions (a structured case's
`response_format` or tools; a model that refuses them fails the case); the checks and the summary are
`distill.tasks`. Owns: resolving an endpoint's model name, answering the cases, the report.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from distill.answers import REMOTE_KEY_ENV, Answer, answer_one, engine_config_for, open_engine
from distill.tasks import TaskCase, score, summary

DEFAULT_SUITE = Path(__file__).resolve().parent.parent / "examples" / "tasks" / "suite.jsonl"
Progress = Callable[[str], None]


def resolve_model(model: str, *, timeout_s: float = 10.0) -> str:
    """`model` as `distill.answers` names it: an endpoint without `#MODEL` gets the first model
    its `/models` lists. ValueError with the reason when that fails."""
    if not model.startswith(("http://", "https://")) or "#" in model:
        return model
    url = model.rstrip("/")
    key = os.environ.get(REMOTE_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(f"{url}/models", headers=headers, timeout=timeout_s)
        response.raise_for_status()
        names = [m["id"] for m in response.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{url}/models: cannot list the endpoint's models ({e}); name one "
                         f"as {url}#MODEL") from None
    if not names:
        raise ValueError(f"{url}/models lists no model; name one as {url}#MODEL")
    return f"{url}#{names[0]}"


def answer_cases(model: str, cases: Sequence[TaskCase], *, n_ctx: int = 2048,
                 n_threads: int | None = None, concurrency: int = 1,
                 progress: Progress | None = None) -> list[Answer]:
    """Greedy answers of `model` to `cases`, in order, `concurrency` at a time."""
    config = engine_config_for(model, n_ctx=n_ctx, n_threads=n_threads)
    say = progress or (lambda _msg: None)

    async def run() -> list[Answer]:
        slots, done = asyncio.Semaphore(max(1, concurrency)), 0

        async def one(case: TaskCase) -> Answer:
            nonlocal done
            fmt, tools = case.conditions()
            async with slots:
                answer = await answer_one(engine, case.messages, max_tokens=case.max_tokens,
                                          response_format=fmt, tools=tools)
            done += 1
            if done % 25 == 0 or done == len(cases):
                say(f"{done}/{len(cases)} answered")
            return answer

        async with open_engine(config) as engine:
            return list(await asyncio.gather(*(one(c) for c in cases)))

    return asyncio.run(run())


def evaluate(model: str, cases: Sequence[TaskCase], *, n_ctx: int = 2048,
             n_threads: int | None = None, concurrency: int = 1, confidence: float = 0.95,
             progress: Progress | None = None) -> dict[str, Any]:
    """The report of `model` on `cases`: per-case rows (answer, passed, why, latency), and the
    pass rate overall and per family with Wilson intervals."""
    model = resolve_model(model)
    started = time.perf_counter()
    answers = answer_cases(model, cases, n_ctx=n_ctx, n_threads=n_threads,
                           concurrency=concurrency, progress=progress)
    rows = score(cases, [a.text for a in answers])
    for row, answer in zip(rows, answers):
        row.update(latency_s=round(answer.latency_s, 4), ttft_s=answer.ttft_s,
                   completion_tokens=answer.completion_tokens,
                   finish_reason=answer.finish_reason)
    return {"model": model, "suite": sorted({c.suite for c in cases}),
            "splits": sorted({c.split for c in cases}), "cases": len(cases),
            "seconds": round(time.perf_counter() - started, 2),
            "summary": summary(rows, confidence), "rows": rows}
