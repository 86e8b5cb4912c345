"""One model variant's replica: a loaded engine, the fan-out of a request's `n` choices, and
the hot swap to a newly promoted version. `InIngress` serves a variant in the ingress's own
process instead (`in_ingress`), one hop fewer.

Where promotions come from is not this module's business: wiring hands a promotable variant a
`PromotionSource` (the registry's, `distill.registry.RegistryPromotions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from ray.serve.exceptions import BackPressureError

from core.config import resolve_path
from core.logging import configure_logging, get_logger
from core.metrics import MetricsReporter, VariantMetrics
from core.priority import lower_priority
from serving.config import VariantConfig
from serving.engines import build_engine
from serving.engines.base import Delta, GenerationRequest, PromptTooLong, Unsupported, merge_deltas
from serving.engines.config import with_model


class PromotionSource(Protocol):
    """Which version a variant should serve, and its files. Methods block (a replica calls them
    from a thread); the object crosses to the replica's process, so it must pickle."""

    poll_s: float  # how often a replica asks

    def promoted(self, variant: str) -> dict | None:
        """`{"version": ..., ...}` of the version promoted for `variant`, or None."""

    def fetch(self, version: str) -> Path:
        """A local path to `version`'s model, its files checked."""

    def fidelity_gap(self, version: str) -> float | None:
        """1 - the teacher-student fidelity recorded for `version`, when known."""


class VariantServer:
    """One replica of one model variant: a loaded engine and the fan-out of `n` choices.

    A `promotable` variant given a `PromotionSource` serves the version promoted for it,
    checking every `poll_s`: a new version's engine is loaded next to the old one, new
    generations go to it, and the old engine is closed once its last generation ends, so a
    promotion fails no request.
    """

    async def __init__(
        self, name: str, config: VariantConfig, log_level: str, json_logs: bool, repo_root: str,
        promotions: PromotionSource | None = None,
    ):
        configure_logging(log_level, json_logs)
        self.name, self.config, self.repo_root = name, config, repo_root
        self.log = get_logger("serving.variant").bind(variant=name)
        self.metrics = VariantMetrics()
        self._n_active = 0
        self._users: dict[int, int] = {}  # id(engine) -> generations running on it
        started = time.monotonic()
        if config.nice:
            lower_priority(config.nice)
        self.promotions = promotions if config.promotable else None
        self._follow = None
        promoted = None
        if self.promotions is not None:
            promoted = await asyncio.to_thread(self.promotions.promoted, name)
        self.engine, self.version = await self._load(config.engine, config.version, promoted)
        self._label(self.version)
        self.reporter = MetricsReporter(
            self.metrics.registry, f"variant:{name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        self.reporter.start()
        self.log.info(
            "serving.variant.loaded", engine=config.engine.engine, version=self.version,
            model=self.engine.info.model, seconds=round(time.monotonic() - started, 2),
        )
        if self.promotions is not None:
            self._follow = asyncio.create_task(self._follow_promotions())

    async def _load(self, engine_config, version: str, promoted: dict | None):
        """A started engine: the promoted version when there is one and it loads,
        else the configured model."""
        if promoted is not None:
            try:
                return await self._load_promoted(promoted), promoted["version"]
            except Exception as e:  # noqa: BLE001 - a bad artifact must not stop the replica
                self.log.error("serving.promotion.failed", version=promoted["version"],
                               error=str(e), serving=version)
        engine = build_engine(engine_config, lambda p: resolve_path(p, self.repo_root))
        await engine.start()
        return engine, version

    async def _load_promoted(self, promoted: dict):
        path = await asyncio.to_thread(self.promotions.fetch, promoted["version"])
        engine = build_engine(with_model(self.config.engine, str(path)),
                              lambda p: resolve_path(p, self.repo_root))
        await engine.start()
        gap = await asyncio.to_thread(self.promotions.fidelity_gap, promoted["version"])
        if gap is not None:
            self.metrics.fidelity_gap.labels(variant=self.name).set(gap)
        return engine

    async def _follow_promotions(self) -> None:
        while True:
            await asyncio.sleep(self.promotions.poll_s)
            try:
                promoted = await asyncio.to_thread(self.promotions.promoted, self.name)
                if promoted is not None and promoted["version"] != self.version:
                    await self._swap(promoted)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep serving the current version
                self.log.error("serving.promotion.failed", error=str(e), serving=self.version)
                await asyncio.sleep(self.promotions.poll_s * 4)

    async def _swap(self, promoted: dict) -> None:
        started = time.monotonic()
        engine = await self._load_promoted(promoted)
        old, old_version = self.engine, self.version
        self.engine, self.version = engine, promoted["version"]
        self._active.set(0)
        self._queued.set(0)
        self.metrics.replica_up.labels(variant=self.name, version=old_version).set(0)
        self._label(self.version)
        self.log.info("serving.variant.promoted", version=self.version, previous=old_version,
                      model=engine.info.model, seconds=round(time.monotonic() - started, 2))
        while self._users.get(id(old)):  # the old engine's last generations finish on it
            await asyncio.sleep(0.05)
        await old.close()

    def _label(self, version: str) -> None:
        labels = {"variant": self.name, "version": version}
        self._active = self.metrics.active.labels(**labels)
        self._queued = self.metrics.queued.labels(**labels)
        self._outcomes = {o: self.metrics.generations.labels(**labels, outcome=o)
                          for o in ("completed", "finish_assumed", "aborted", "rejected",
                                    "failed")}
        self.metrics.replica_up.labels(**labels).set(1)
        self._set_active(0)

    async def complete(self, requests: list[GenerationRequest]) -> list[Delta]:
        """Generate every choice to the end; one merged delta per choice, in order."""
        return list(await asyncio.gather(*(self._collect(r) for r in requests)))

    async def stream(self, requests: list[GenerationRequest]
                     ) -> AsyncIterator[list[tuple[int, Delta]]]:
        """Yield batches of `(choice index, delta)` as the choices produce them.

        Whatever has queued up since the last batch goes out as one batch: every item that
        crosses Ray costs CPU, so a fast engine is not charged one item per token. With
        `stream_interval_s`, batches after the first one with text wait until that long after
        the previous one, unless a choice has just finished.
        """
        queue: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()
        interval, loop, last = self.config.stream_interval_s, asyncio.get_running_loop(), None

        async def pump(index: int, request: GenerationRequest) -> None:
            try:
                async for delta in self._generate(request):
                    queue.put_nowait((index, delta))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer below
                queue.put_nowait(e)
                return
            queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                batch: list[tuple[int, Delta]] = []
                item = await queue.get()
                if interval and last is not None and isinstance(item, tuple) \
                        and item[1].finish_reason is None:
                    await asyncio.sleep(last + interval - loop.time())  # <= 0: no wait
                while True:
                    if item is None:
                        remaining -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        batch.append(item)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    yield batch
                    if last is None and not any(d.text for _, d in batch):
                        continue  # nothing visible yet: the first text still goes at once
                    last = loop.time()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, request: GenerationRequest) -> Delta:
        return merge_deltas([d async for d in self._generate(request)])

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        engine, version, outcomes = self.engine, self.version, self._outcomes
        self._users[id(engine)] = self._users.get(id(engine), 0) + 1
        self._set_active(+1)
        outcome = "aborted"
        gen = None
        try:
            gen = engine.generate(request)
            first = True
            assumed = False
            async for delta in gen:
                if first:
                    delta.model_version, first = version, False
                assumed = assumed or delta.finish_assumed
                yield delta
            outcome = "finish_assumed" if assumed else "completed"
        except (PromptTooLong, Unsupported):
            outcome = "rejected"
            raise
        except Exception:
            outcome = "failed"
            raise
        finally:
            if gen is not None:
                await gen.aclose()
            self._users[id(engine)] -= 1
            if not self._users[id(engine)]:
                del self._users[id(engine)]
            self._set_active(-1)
            outcomes[outcome].inc()
            if outcome == "aborted":
                self.log.info("serving.generation.aborted", request_id=request.request_id)

    def _set_active(self, change: int) -> None:
        self._n_active += change
        self._active.set(self._n_active)
        self._queued.set(max(0, self._n_active - self.engine.info.max_concurrency))

    async def close(self) -> None:
        """Stop following promotions and the metrics reporter; close the engine."""
        if self._follow is not None:
            self._follow.cancel()
        await self.reporter.stop()
        await self.engine.close()


class VariantDeployment(VariantServer):
    """A `VariantServer` as a Ray Serve deployment's replica, closed when the replica stops
    (Ray Serve awaits an async `__del__`). An `InIngress` server has no `__del__`: the ingress
    awaits its `close`, and the garbage collector finds nothing left to await."""

    async def __del__(self) -> None:
        await self.close()


class InIngress:
    """A variant served in the ingress's process, called as its deployment would be: `complete`
    gives a task to await or cancel, `stream` an iterator of batches to cancel. Requests beyond
    `max_ongoing_requests` wait; beyond that plus `max_queued_requests` they are refused with
    Ray Serve's `BackPressureError`, as the deployment's router would."""

    def __init__(self, server: VariantServer, config: VariantConfig):
        self.server = server
        self._slots = asyncio.Semaphore(config.max_ongoing_requests)
        self._max_queued = config.max_queued_requests
        self._waiting = 0

    @classmethod
    async def start(cls, name: str, config: VariantConfig, log_level: str, json_logs: bool,
                    repo_root: str) -> InIngress:
        server = VariantServer.__new__(VariantServer)  # its __init__ is async (Ray Serve's way)
        await server.__init__(name, config, log_level, json_logs, repo_root)
        return cls(server, config)

    def complete(self, requests: list[GenerationRequest]) -> asyncio.Task[list[Delta]]:
        async def run() -> list[Delta]:
            async with self._admitted():
                return await self.server.complete(requests)

        return asyncio.ensure_future(run())

    def stream(self, requests: list[GenerationRequest]) -> InIngressStream:
        async def batches() -> AsyncIterator[list[tuple[int, Delta]]]:
            async with self._admitted():
                async for batch in self.server.stream(requests):
                    yield batch

        return InIngressStream(batches())

    @contextlib.asynccontextmanager
    async def _admitted(self):
        if self._slots.locked() and 0 <= self._max_queued <= self._waiting:
            raise BackPressureError(num_queued_requests=self._waiting,
                                    max_queued_requests=self._max_queued)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def close(self) -> None:
        await self.server.close()


class InIngressStream:
    """`InIngress.stream`'s batches: `__anext__` as a Ray response generator's, and `cancel`."""

    def __init__(self, batches: AsyncIterator[list[tuple[int, Delta]]]):
        self._batches = batches

    def __anext__(self):
        return self._batches.__anext__()

    def cancel(self) -> None:
        async def close() -> None:
            with contextlib.suppress(RuntimeError):  # still running: its cancel closes it
                await self._batches.aclose()

        asyncio.ensure_future(close())
