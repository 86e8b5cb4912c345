"""When the ingress's mirrored jobs leave for the shadow worker: one call per batch, sent once
no more jobs can join it, or after the linger."""

from __future__ import annotations

import asyncio

import structlog

from core.metrics import GatewayMetrics
from serving import outbox as outbox_module
from serving.engines.base import GenerationRequest, Message, SamplingParams
from serving.outbox import ShadowOutbox
from shadow.ledger import Ledger
from shadow.mirror import MirrorJob
from shadow.records import Answer

REQUEST = GenerationRequest("r", SamplingParams(8), messages=(Message("user", "hi"),))
STUDENT = Answer("student", "s1", "a", "stop", 3, 1, 1.0, 2.0)


class Worker:
    """The shadow worker's `mirror_batch`, as a handle calls it: each call's jobs, held until
    `done` is set (the teacher is still working on them)."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.done = asyncio.Event()
        self.mirror_batch = self

    async def remote(self, jobs):
        self.calls.append([j.pair_id for j in jobs])
        await self.done.wait()


def job(i: int, target: str = "teacher") -> MirrorJob:
    return MirrorJob(f"p{i}", "route", "student", target, REQUEST, False, STUDENT, "")


def outbox(worker: Worker, tmp_path, budget: int) -> ShadowOutbox:
    return ShadowOutbox(worker, GatewayMetrics(), Ledger(tmp_path, "run", "test"),
                        structlog.get_logger(), budget, flush_responses=False)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_batch_leaves_at_once_when_the_budget_is_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_module, "MIRROR_LINGER_S", 60.0)  # the linger never ends here
    worker = Worker()
    box = outbox(worker, tmp_path, budget=3)
    box.mirror(job(1))
    box.mirror(job(2))
    await settle()
    assert worker.calls == []  # two can still be joined by a third
    box.mirror(job(3))
    await settle()
    assert worker.calls == [["p1", "p2", "p3"]]  # the third took the budget: sent as one call
    box.mirror(job(4))  # over the budget while the teacher works: dropped, never sent
    worker.done.set()
    await settle()
    box.mirror(job(5))
    box.mirror(job(6))
    await settle()
    assert worker.calls == [["p1", "p2", "p3"]]
    await box.close()
    await settle()
    assert worker.calls == [["p1", "p2", "p3"], ["p5", "p6"]]


async def test_with_a_budget_of_one_nothing_lingers(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_module, "MIRROR_LINGER_S", 60.0)
    worker = Worker()
    box = outbox(worker, tmp_path, budget=1)
    box.mirror(job(1))
    await settle()
    assert worker.calls == [["p1"]]
    worker.done.set()
    await box.close()


async def test_a_batch_leaves_after_the_linger(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_module, "MIRROR_LINGER_S", 0.05)
    worker = Worker()
    worker.done.set()
    box = outbox(worker, tmp_path, budget=100)
    box.mirror(job(1))
    box.mirror(job(2, target="other"))
    await settle()
    assert worker.calls == []
    await asyncio.sleep(0.2)
    assert worker.calls == [["p1"], ["p2"]]  # one call per teacher
    await box.close()
