"""What the ingress sends to the shadow worker, off the request path: mirrored requests and
answered responses, in batches.

Mirrored jobs leave in batches of one teacher: one call to the worker per batch keeps the share
of the mirror's cost on the users' cores small (each call through Ray costs CPU in the ingress,
the worker and the teacher). A batch goes after `MIRROR_LINGER_S`, or at once when no more jobs
can join it: `MIRROR_BATCH` are waiting, or its teacher's budget is taken. While a replica has
`budget` jobs a teacher has not finished, that teacher is saturated: the sample is dropped
(`budget`), so the effective sample rate falls to what the teacher keeps up with and no work
queues up behind the users. Each teacher has a budget of its own: one that hangs costs
only the routes that mirror to it. Answered responses (for feedback) go every
`RESPONSE_FLUSH_S`, or as soon as `RESPONSE_BATCH` wait. Nothing here waits on the request path
or fails a user's answer: every loss is counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from core.metrics import GatewayMetrics
from shadow.ledger import Ledger
from shadow.mirror import MirrorJob, teacher_key
from shadow.records import ResponseRecord

MIRROR_BATCH = 64  # mirrored jobs per call to the shadow worker, at most
MIRROR_LINGER_S = 0.5  # how long a job waits for others to share its call
RESPONSE_FLUSH_S = 0.5  # answered responses go to the shadow worker in batches this often
RESPONSE_BATCH = 512  # or as soon as this many are waiting

# A mirror's outcome -> the reason its pair is counted as dropped (`sent` is no loss).
DROP_REASON = {"budget": "budget", "queue_full": "worker_busy", "failed": "handoff_failed",
               "cancelled": "cancelled"}


class ShadowOutbox:
    """One ingress replica's batches to the shadow worker `shadow` (see the module doc)."""

    def __init__(self, shadow: DeploymentHandle, metrics: GatewayMetrics, ledger: Ledger | None,
                 log, budget: int, *, flush_responses: bool):
        self.shadow, self.metrics, self.ledger, self.log = shadow, metrics, ledger, log
        self.budget = budget
        self._mirrors: set[asyncio.Task] = set()  # fire-and-forget handoffs still running
        self._boxes: dict[str, list[MirrorJob]] = {}  # by teacher: jobs waiting for a batch
        self._linger: asyncio.TimerHandle | None = None
        self._unfinished: collections.Counter[str] = collections.Counter()  # by teacher
        self._responses: list[ResponseRecord] = []  # answered, not yet sent to the worker
        self._flusher = None
        if flush_responses:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_responses_forever(), context=contextvars.Context())

    # -- mirrors ----------------------------------------------------------------------------

    def mirror(self, job: MirrorJob) -> None:
        """Queue a sampled request for its teacher; never waits, never fails the user."""
        self.ledger.sampled(job.pair_id)
        key = teacher_key(job)
        if self._unfinished[key] >= self.budget:
            self._count(job, "budget")
            return
        self._unfinished[key] += 1
        box = self._boxes.setdefault(key, [])
        box.append(job)
        if len(box) >= MIRROR_BATCH or self._unfinished[key] >= self.budget:
            self.send_mirrors()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(
                MIRROR_LINGER_S, self.send_mirrors)

    def send_mirrors(self) -> None:
        """Send every waiting batch now."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        boxes, self._boxes = self._boxes, {}
        for key, jobs in boxes.items():
            # A fresh context: the handoff is no child of the user's request, so Ray Serve
            # does not cancel it when that request ends (a streaming client closes right after
            # [DONE]).
            task = asyncio.get_running_loop().create_task(
                self._hand_off(key, jobs), context=contextvars.Context())
            self._mirrors.add(task)
            task.add_done_callback(self._mirrors.discard)

    async def _hand_off(self, key: str, jobs: list[MirrorJob]) -> None:
        outcome = "sent"
        try:
            await self.shadow.mirror_batch.remote(jobs)  # returns once the teacher is done
        except BackPressureError:
            outcome = "queue_full"
        except asyncio.CancelledError:  # the ingress is stopping
            outcome = "cancelled"
            raise
        except Exception as e:  # noqa: BLE001 - counted; the users have their answers already
            outcome = "failed"
            self.log.info("shadow.handoff.failed", pairs=len(jobs), error=str(e)[:300])
        finally:
            self._unfinished[key] -= len(jobs)
            for job in jobs:
                self._count(job, outcome)

    def _count(self, job: MirrorJob, outcome: str) -> None:
        self.metrics.mirrored.labels(route=job.route, target=job.target, outcome=outcome).inc()
        if outcome != "sent":  # the pair will never exist: one of the shadow's counted losses
            self.metrics.shadow_dropped.labels(kind="pair", reason=DROP_REASON[outcome]).inc()
            self.ledger.dropped(job.pair_id, DROP_REASON[outcome])

    # -- answered responses -----------------------------------------------------------------

    def response(self, row: ResponseRecord) -> None:
        """Keep an answered response for feedback; it leaves with the next batch."""
        self._responses.append(row)
        if len(self._responses) >= RESPONSE_BATCH:
            asyncio.get_running_loop().create_task(
                self.flush_responses(), context=contextvars.Context())

    async def _flush_responses_forever(self) -> None:
        while True:
            await asyncio.sleep(RESPONSE_FLUSH_S)
            await self.flush_responses()

    async def flush_responses(self) -> None:
        """Send the answered responses waiting now."""
        batch, self._responses = self._responses, []
        if not batch:
            return
        outcome = "sent"
        try:
            await self.shadow.record_responses.remote(batch)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:  # noqa: BLE001 - counted; feedback on these ids will 404
            outcome = "failed"
            self.log.warning("feedback.responses.not_sent", responses=len(batch),
                             error=str(e)[:300])
        finally:
            self.metrics.responses_logged.labels(outcome=outcome).inc(len(batch))

    async def close(self) -> None:
        """Send what waits (a mirror that cannot finish is counted) and stop flushing."""
        self.send_mirrors()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(BaseException):
                await self._flusher
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush_responses(), 5)
