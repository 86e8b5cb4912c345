"""Soft targets from a prompt pool: the teacher answers prompts the shadow has not seen.

When the shadow holds too few pairs to learn from, the loop sends a pool of prompts (task
cases of `distill.tasks`, split `train`) to the teacher and keeps an answer only when it passes
the case's own check: a student should not learn the teacher's mistakes. Answers are appended
to a cache file as they come, so a killed run resumes where it stopped and a later run reuses
them (the cache is keyed by the teacher and each prompt).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill.answers import answer_one, engine_config_for, open_engine
from distill.gate.checks import check_answer
from distill.tasks import TaskCase

Progress = Callable[[str], None]


def prompt_key(teacher: str, case: TaskCase) -> str:
    """The cache key of one answer: the teacher, the prompt and the answer budget."""
    text = json.dumps([teacher, case.messages, case.max_tokens], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """key -> {"answer", "finish_reason"} from a cache file; a torn last line is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            out[row["key"]] = row
    return out


def example(case: TaskCase, answer: str) -> dict[str, Any]:
    """A chat example in `protege dataset export`'s shape, marked as coming from the pool."""
    return {"id": f"pool-{case.id}", "messages": [*case.messages,
                                                  {"role": "assistant", "content": answer}],
            "split": "train", "source": "pool", "family": case.family}


def teacher_examples(teacher: str, pool: Sequence[TaskCase], want: int, *, cache: Path,
                     exclude: set[str] = frozenset(), n_threads: int | None = None,
                     seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Up to `want` examples whose teacher answer passes its check, from `pool` in a seeded
    order (prompts whose user message is in `exclude` are skipped). Returns {"examples",
    "asked", "kept", "failed_check"}: the teacher stops once `want` are kept."""
    say = progress or (lambda _msg: None)
    order = [c for c in pool if c.messages[-1]["content"] not in exclude]
    random.Random(seed).shuffle(order)
    known = read_cache(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    kept: list[dict[str, Any]] = []
    counts = {"asked": 0, "failed_check": 0, "cut": 0}

    def take(case: TaskCase, row: dict[str, Any]) -> None:
        counts["asked"] += 1
        if row["finish_reason"] == "length":
            counts["cut"] += 1
        elif check_answer(row["answer"], case.check)[0]:
            kept.append(example(case, row["answer"]))
        else:
            counts["failed_check"] += 1

    async def run() -> None:
        async with _Lazy(teacher, n_threads) as lazy:
            with open(cache, "a", encoding="utf-8") as out:
                for case in order:
                    if len(kept) >= want:
                        break
                    key = prompt_key(teacher, case)
                    row = known.get(key)
                    if row is None:
                        engine = await lazy.engine()
                        a = await answer_one(engine, case.messages, max_tokens=case.max_tokens)
                        row = {"key": key, "id": case.id, "answer": a.text,
                               "finish_reason": a.finish_reason}
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        out.flush()
                    take(case, row)
                    if counts["asked"] % 50 == 0:
                        say(f"top-up: {counts['asked']} pool prompts, {len(kept)} answers kept")

    asyncio.run(run())
    say(f"top-up: {len(kept)} of {counts['asked']} teacher answers kept "
        f"({counts['failed_check']} failed their check, {counts['cut']} were cut)")
    return {"examples": kept, "kept": len(kept), **counts}


class _Lazy:
    """The teacher's engine, started only when an answer is not in the cache."""

    def __init__(self, teacher: str, n_threads: int | None):
        self.teacher, self.n_threads = teacher, n_threads
        self._context = None
        self._engine = None

    async def engine(self):
        if self._engine is None:
            self._context = open_engine(engine_config_for(self.teacher, n_threads=self.n_threads))
            self._engine = await self._context.__aenter__()
        return self._engine

    async def __aenter__(self) -> _Lazy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._context is not None:
            await self._context.__aexit__(*exc)
