"""The shadow worker: a Ray Serve deployment that calls teachers, scores pairs and stores them,
and keeps the record of answered responses that feedback is given on.

The ingresses send it batches of `MirrorJob`s after the users have their answers and do not
wait for the result. The worker runs at most `max_concurrency` calls at once to each teacher
and lets at most `max_pending` jobs wait for each (more are dropped, `worker_busy`): a local
variant is one teacher for every route that mirrors to it, a remote endpoint one per route.
Each job: call the teacher (a local variant through its handle, or a remote endpoint with the
marker header) in the same streaming mode, with a timeout and no retries; score the two answers in a worker
thread (the embedder is loaded once, here, off the request path); offer the record to the pair
writer, which batches it into the store or spills it. Failures are counted, never raised.

On routes with feedback the ingresses send batches of answered responses (`record_responses`);
`feedback` finds the response (recent ones in memory, older ones in the store), stores the
feedback and counts it by route, arm, version and metric.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx

from core.logging import configure_logging, get_logger
from core.metrics import MetricsReporter, ShadowMetrics
from core.priority import lower_priority
from serving.engines.base import Delta, GenerationRequest
from serving.engines.config import RemoteEngine as RemoteConfig
from serving.engines.remote import RemoteEngine
from serving.engines.structured import check_answer
from shadow.config import ShadowSettings
from shadow.feedback import FeedbackPost
from shadow.ledger import Ledger, current_run, finished, read_ledgers, reconcile
from shadow.mirror import (
    MARKER_HEADER,
    MirrorJob,
    answer_from,
    make_record,
    teacher_key,
    timed_answer,
)
from shadow.records import FeedbackRecord, PairRecord, ResponseRecord
from shadow.scoring import score_pair
from shadow.store import PairWriter, open_store

RECENT_RESPONSES = 100_000  # answered responses kept in memory for feedback lookups
RECONCILE_EVERY_S = 60.0  # how often this run's closed ledger files are accounted for
LATE_RESPONSE_S = 2.0  # how long feedback waits for a response another ingress has not sent yet


class ShadowWorker:
    async def __init__(self, settings: ShadowSettings, remotes: dict[str, RemoteConfig],
                   teachers: dict, versions: dict[str, str], repo_root: str,
                   log_level: str, json_logs: bool, run: str):
        """`remotes`: remote teachers by route; `teachers`: local variants' handles by name,
        with their `versions`; `run`: this gateway run's id (its ledger files)."""
        configure_logging(log_level, json_logs)
        if settings.nice:
            lower_priority(settings.nice)
        self.log = get_logger("shadow.worker")
        # By teacher (`teacher_key`): each its own `max_concurrency` slots and `max_pending`
        # waiting jobs, so a teacher that hangs costs only the routes that mirror to it.
        self._slots: dict[str, asyncio.Semaphore] = {}  # teacher requests at once
        self._admission: dict[str, asyncio.Lock] = {}
        self._waiting: collections.Counter[str] = collections.Counter()  # jobs waiting for one
        self.settings, self.teachers, self.versions = settings, teachers, versions
        root = Path(repo_root)
        self.metrics = ShadowMetrics()
        self.store = open_store(settings, root)
        self.ledger_dir = root / settings.spill_dir / "ledger"
        self.run = run
        self.ledger = Ledger(self.ledger_dir, run, f"worker-{os.getpid()}",
                             on_error=self._ledger_failed)
        self.writer = PairWriter(self.store, self.metrics, root / settings.spill_dir,
                                 max_spill_bytes=int(settings.max_spill_mb * 2**20),
                                 on_drop=self._ledger_drop)
        self.writer.start()
        self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_forever())
        self.redactor = settings.redaction.redactor()
        self._recent: collections.OrderedDict[str, ResponseRecord] = collections.OrderedDict()
        self.remotes: dict[str, RemoteEngine] = {}
        self._clients: list[httpx.AsyncClient] = []
        for name, cfg in remotes.items():
            self._clients.append(client := _marked_client(cfg))
            engine = RemoteEngine(cfg, client=client)
            await engine.start()
            self.remotes[name] = engine
        self.embed = None
        if settings.semantic_model and (root / settings.semantic_model).is_dir():
            from shadow.embedder import SemanticEmbedder  # torch: only with a semantic model

            self.embed = await asyncio.to_thread(
                SemanticEmbedder, root / settings.semantic_model, threads=1)
        self.reporter = MetricsReporter(
            self.metrics.registry, f"shadow:{os.getpid()}:{uuid.uuid4().hex[:6]}")
        self.reporter.start()
        self.log.info("shadow.worker.started", store=settings.store,
                      semantic=self.embed is not None, remotes=sorted(self.remotes))

    async def mirror_batch(self, jobs: list[MirrorJob]) -> None:
        """Run a batch of mirrored jobs from an ingress; returns when all are finished.

        Jobs for the same local teacher in the same streaming mode share one call to it (in
        groups of at most `max_concurrency`): a call through Ray costs CPU on shared cores.
        """
        groups: dict[tuple[str, bool], list[MirrorJob]] = collections.defaultdict(list)
        alone = []
        for job in jobs:
            if job.route in self.remotes:
                alone.append([job])
            else:
                groups[(job.target, job.stream)].append(job)
        size = self.settings.max_concurrency
        chunks = [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]
        await asyncio.gather(*(self._admit(chunk) for chunk in [*chunks, *alone]))

    async def _admit(self, jobs: list[MirrorJob]) -> None:
        """At most `max_concurrency` requests at once to a teacher (a group takes one slot per
        job); beyond `max_pending` jobs waiting for it, a job is dropped (`worker_busy`)."""
        key = teacher_key(jobs[0])
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(self.settings.max_concurrency)
            self._admission[key] = asyncio.Lock()
        slots = self._slots[key]
        room = self.settings.max_pending - self._waiting[key]
        for job in jobs[max(0, room):]:
            self.metrics.dropped.labels(kind="pair", reason="worker_busy").inc()
            self.ledger.dropped(job.pair_id, "worker_busy")
        jobs = jobs[:max(0, room)]
        if not jobs:
            return
        self._waiting[key] += len(jobs)
        taken = 0
        try:
            async with self._admission[key]:  # one group at a time takes its slots: no deadlock
                for _ in jobs:
                    await slots.acquire()
                    taken += 1
        except BaseException:
            for _ in range(taken):
                slots.release()
            raise
        finally:
            self._waiting[key] -= len(jobs)
        try:
            await self._mirror(jobs)
        finally:
            for _ in jobs:
                slots.release()

    async def _mirror(self, jobs: list[MirrorJob]) -> None:
        """One teacher call for `jobs` (one remote job, or a group for one local teacher)."""
        labels = {"route": jobs[0].route, "target": jobs[0].target}
        requests = [teacher_request(j.request, self.settings.teacher_top_logprobs) for j in jobs]
        for job in jobs:
            self.metrics.in_flight.labels(route=job.route, target=job.target).inc()
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                answers = await self._teacher(jobs, requests)
        except Exception as e:  # noqa: BLE001 - a failing teacher is counted, never raised
            reason = "timeout" if isinstance(e, TimeoutError) else "failed"
            for job in jobs:
                self.metrics.requests.labels(route=job.route, target=job.target,
                                             outcome=reason).inc()
                self.metrics.dropped.labels(kind="pair", reason=f"teacher_{reason}").inc()
                self.ledger.dropped(job.pair_id, f"teacher_{reason}")
            self.log.info(f"shadow.teacher.{reason}", pairs=len(jobs), error=str(e)[:300],
                          **labels)
            return
        finally:
            for job in jobs:
                self.metrics.in_flight.labels(route=job.route, target=job.target).dec()
        for job, (answer, _) in zip(jobs, answers, strict=True):
            job_labels = {"route": job.route, "target": job.target}
            self.metrics.requests.labels(**job_labels, outcome="completed").inc()
            self.metrics.teacher_latency.labels(**job_labels).observe(answer.latency_ms / 1000)
            if answer.ttft_ms is not None:
                self.metrics.teacher_ttft.labels(**job_labels).observe(answer.ttft_ms / 1000)
        started = time.monotonic()
        all_scores = await asyncio.to_thread(self._score, jobs, [a for a, _ in answers])
        self.metrics.scorer_latency.observe((time.monotonic() - started) / len(jobs))
        for job, (answer, logprobs), scores in zip(jobs, answers, all_scores, strict=True):
            self.metrics.disagreement.labels(
                route=job.route, variant=job.variant, version=job.student.version or "-",
            ).observe(scores["disagreement"])
            record, redacted = make_record(job, answer, logprobs, scores, self.redactor)
            for kind, n in redacted.items():
                self.metrics.redactions.labels(kind=kind).inc(n)
            self.writer.offer(record)

    def _score(self, jobs: list[MirrorJob], answers: list) -> list[dict]:
        """Scores of each pair (a worker thread: the embedder and the scorers are CPU work)."""
        return [score_pair(job.student.text, answer.text, labels=job.labels,
                           weights=self.settings.weights, embed=self.embed,
                           conforms=_conforms(job.request.params.response_format))
                for job, answer in zip(jobs, answers, strict=True)]

    def _ledger_failed(self, error: OSError) -> None:
        self.metrics.ledger_errors.inc()
        self.log.warning("shadow.ledger.write_failed", error=repr(error)[:300])

    def _ledger_drop(self, record, reason: str) -> None:
        if isinstance(record, PairRecord):
            self.ledger.dropped(record.pair_id, reason)

    async def _reconcile_forever(self) -> None:
        """Account for the pairs of finished ledger files (see `shadow.ledger`): at start (an
        earlier run's), then every `RECONCILE_EVERY_S` (this run's closed files)."""
        while True:
            if not self.writer.spill_pending:  # spilled pairs must be back in the store first
                try:
                    await self._reconcile_finished()
                except Exception as e:  # noqa: BLE001 - the files stay for the next round
                    self.log.warning("shadow.ledger.reconcile_failed", error=repr(e)[:300])
            await asyncio.sleep(1.0 if self.writer.spill_pending else RECONCILE_EVERY_S)

    async def _reconcile_finished(self) -> None:
        s = self.settings
        # Long enough for every mirror a file sampled to be over: queued, then the teacher call.
        min_age_s = s.timeout_s * (1 + s.max_pending / s.max_concurrency) + 60
        files = finished(self.ledger_dir, self.run, now=time.time(), min_age_s=min_age_s)
        if not files:
            return
        others = [p for p in current_run(self.ledger_dir, self.run) if p not in files]
        sampled, dropped = await asyncio.to_thread(read_ledgers, files)
        dropped += (await asyncio.to_thread(read_ledgers, others))[1]
        result = await asyncio.to_thread(reconcile, sampled, dropped, self.store.existing)
        self.metrics.dropped.labels(kind="pair", reason="crash").inc(len(result.crashed))
        summary = {"at": datetime.now(UTC).isoformat(), "run": self.run,
                   "files": [f.name for f in files], "sampled": result.sampled,
                   "stored": result.stored, "dropped": result.dropped,
                   "balanced": result.balanced, "crashed": list(result.crashed[:1000])}
        await asyncio.to_thread(_close_books, self.ledger_dir / "reconciled.jsonl", summary, files)
        self.log.info("shadow.ledger.reconciled", sampled=result.sampled, stored=result.stored,
                      dropped=result.dropped, files=len(files))

    async def record_responses(self, rows: list[ResponseRecord]) -> None:
        """Remember answered responses (for feedback) and queue them for the store."""
        for row in rows:
            self._recent[row.response_id] = row
            self.writer.offer(row)
        while len(self._recent) > RECENT_RESPONSES:
            self._recent.popitem(last=False)

    async def feedback(self, post: FeedbackPost, created_at: str) -> dict:
        """Store one piece of feedback: `{"id": ...}`, or `{"error": "unknown_response"}`, or
        `{"error": "store_unavailable"}` (nothing was stored; the client may retry)."""
        response = await self._find_response(post.response_id)
        if response is None:
            return {"error": "unknown_response"}
        comment = post.comment
        if comment is not None and self.redactor is not None:
            comment, redacted = self.redactor.redact(comment)
            for kind, n in redacted.items():
                self.metrics.redactions.labels(kind=kind).inc(n)
        record = FeedbackRecord("fb-" + uuid.uuid4().hex, response, post.metric, post.value,
                                comment, created_at)
        try:
            await asyncio.to_thread(self.store.add_feedback, record)
        except Exception as e:  # noqa: BLE001 - the client is told and may retry
            self.log.warning("shadow.feedback.store_failed", error=repr(e)[:300])
            return {"error": "store_unavailable"}
        labels = {"route": response.route, "variant": response.variant,
                  "version": response.version, "metric": post.metric}
        self.metrics.feedback.labels(**labels).inc()
        if post.value is not None:
            self.metrics.feedback_value.labels(**labels).inc(post.value)
        return {"id": record.feedback_id}

    async def _find_response(self, response_id: str) -> ResponseRecord | None:
        """In memory, else in the store; an id not seen yet may still be on its way from
        another ingress replica (they send every half second), so wait a little for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LATE_RESPONSE_S
        stored = True
        while True:
            if response_id in self._recent:
                return self._recent[response_id]
            if stored:
                try:
                    found = await asyncio.to_thread(self.store.get_response, response_id)
                except Exception as e:  # noqa: BLE001 - treated as not found yet
                    self.log.warning("shadow.feedback.lookup_failed", error=repr(e)[:300])
                    found = None
                if found is not None:
                    return found
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.25)
            stored = loop.time() + 0.25 >= deadline  # look in the store again at the end

    async def _teacher(self, jobs: list[MirrorJob], requests: list[GenerationRequest]) -> list:
        """Each job's `(Answer, logprobs)`: a remote endpoint for one job, or one call to a
        local variant for a group (each answer timed from the call's start)."""
        first = jobs[0]
        model, version = first.target.removeprefix("remote:"), self.versions.get(first.target)
        if first.route in self.remotes:
            return [await timed_answer(self.remotes[first.route].generate(requests[0]), model,
                                       version)]
        handle = self.teachers[first.target]
        started = time.monotonic()
        if not first.stream:
            deltas = await handle.complete.remote(requests)
            done = time.monotonic()
            return [answer_from([d], started, done, done, model, version) for d in deltas]
        seen: list[list[Delta]] = [[] for _ in requests]
        firsts: list[float | None] = [None] * len(requests)
        ends = [started] * len(requests)
        async for batch in handle.options(stream=True).stream.remote(requests):
            now = time.monotonic()
            for index, delta in batch:
                if firsts[index] is None and (delta.text or delta.token_ids):
                    firsts[index] = now
                seen[index].append(delta)
                ends[index] = now
        return [answer_from(seen[i], started, firsts[i], ends[i], model, version)
                for i in range(len(requests))]

    async def __del__(self) -> None:
        self._reconciler.cancel()
        await self.writer.close()
        self.ledger.close()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        await self.reporter.stop()


def teacher_request(request: GenerationRequest, top_logprobs: int | None) -> GenerationRequest:
    """The user's request as the teacher gets it: its own id, and top-k logprobs asked for."""
    params = request.params
    if top_logprobs is not None:
        params = replace(params, logprobs=max(params.logprobs or 0, top_logprobs))
    return replace(request, request_id="shadow-" + request.request_id, params=params)


def _close_books(summaries: Path, summary: dict, files: list[Path]) -> None:
    """Append the summary of a reconciliation, then delete the files it accounted for."""
    with open(summaries, "a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    for file in files:
        file.unlink()


def _marked_client(cfg: RemoteConfig) -> httpx.AsyncClient:
    """The remote teacher's client: like the remote engine's own, plus the marker header."""
    return httpx.AsyncClient(
        base_url=cfg.base_url.rstrip("/") + "/",
        timeout=httpx.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)),
        limits=httpx.Limits(max_connections=cfg.max_connections,
                            max_keepalive_connections=cfg.max_connections),
        headers={MARKER_HEADER: "1"},
    )


def _conforms(fmt):
    """The request's response format as a test of an answer; None when it had none."""
    if fmt is None:
        return None
    return lambda text: check_answer(fmt, text) is None
