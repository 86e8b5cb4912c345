"""`PairWriter`: moves records from the request side to a `PairStore` in batches, off the event
loop, and spills what the store refuses. Does not own
what a record holds (`shadow.records`) or scoring.

Nothing is lost silently. Every record offered to a writer ends in exactly one of:
`records{outcome="stored"}`, `records{outcome="spilled"}` (the store failed: the batch went to
an fsynced JSON-lines spill file, replayed into the store once a write succeeds again, counted
`replayed` then), or `dropped{reason}`:
  queue_full     the writer's queue was full (`offer` never waits)
  closed         offered after `close()`
  invalid        neither the store nor the spill file could serialise the record
  store_error    the store failed and so did the spill file
  spill_corrupt  an unreadable line of a spill file (a write torn by a crash)

Writes are idempotent on `pair_id` (the first write wins; a replay never duplicates or
overwrites a pair), so a batch written twice, e.g. replayed after a crash mid-replay, is safe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from core.logging import get_logger
from core.metrics import ShadowMetrics
from shadow.records import ResponseRecord, from_spill_line, spill_line
from shadow.store.base import PairStore, Record

log = get_logger("shadow.store")


class PairWriter:
    """Batches records into a `PairStore` from a background task (see the module doc).

    `offer` is the only call on the request side: it never waits. `start()` (inside a running
    loop) starts the task, which first replays a spill file left by an earlier process;
    `close()` drains the queue. Store and spill-file work runs in one worker thread at a time.

    Spill files are `<spill_dir>/<name>.spill.jsonl` (appended) and `<name>.replaying.jsonl`
    (being replayed). One writer per name: a lock file refuses a second one, so give each
    process (replica) its own name, and reuse the name on restart to replay what it left.
    """

    def __init__(
        self,
        store: PairStore,
        metrics: ShadowMetrics,
        spill_dir: str | os.PathLike[str],
        *,
        name: str = "pairs",
        maxsize: int = 10_000,
        batch_size: int = 256,
        flush_interval_s: float = 1.0,
        on_drop: Callable[[Record, str], None] | None = None,
        max_spill_bytes: int = 1 << 30,
    ):
        if maxsize < 1 or batch_size < 1 or flush_interval_s <= 0:
            raise ValueError(f"PairWriter needs maxsize >= 1, batch_size >= 1 and "
                             f"flush_interval_s > 0; got {maxsize}, {batch_size}, "
                             f"{flush_interval_s}")
        self.store, self.metrics = store, metrics
        self.max_spill_bytes = max_spill_bytes  # spill and replaying files together
        self.spill_dir = Path(spill_dir)
        self.spill_path = self.spill_dir / f"{name}.spill.jsonl"
        self.replaying_path = self.spill_dir / f"{name}.replaying.jsonl"
        self._lock_path = self.spill_dir / f"{name}.lock"
        self.batch_size, self.flush_interval_s = batch_size, flush_interval_s
        self._queue: asyncio.Queue[Record] = asyncio.Queue(maxsize)
        self._files = threading.Lock()  # spill files: the worker thread vs close()'s last spill
        self._spill_pending = False
        self._lock_fd: int | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._on_drop = on_drop  # told of each dropped record and the reason (the ledger)

    @property
    def spill_pending(self) -> bool:
        """True while spilled records wait to be replayed into the store."""
        return self._spill_pending

    # --- the request side -----------------------------------------------------------------------

    def offer(self, record: Record) -> bool:
        """Queue a record for writing; False (and counted as dropped) when it cannot be."""
        if self._closed:
            self._count("dropped", "closed", [record])
            return False
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._count("dropped", "queue_full", [record])
            return False
        self.metrics.queue_depth.set(self._queue.qsize())
        return True

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another PairWriter holds {self._lock_path}: give each process "
                               "its own writer name") from None
        self._lock_fd = fd
        self._spill_pending = self.spill_path.exists() or self.replaying_path.exists()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pair-writer")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking records and write what is queued; at the deadline, spill the rest.

        A batch whose write is running at the deadline finishes in its thread and counts
        itself (stored or spilled); this call does not wait for it."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout_s)
            except TimeoutError:
                log.warning("shadow.writer.drain_timed_out", left=self._queue.qsize(),
                            timeout_s=timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A batch whose thread is still running accounts for itself; what is queued is spilled.
        left = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
            self._queue.task_done()
        if left:
            await asyncio.to_thread(self._spill_sync, left)
        self.metrics.queue_depth.set(0)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- the background task --------------------------------------------------------------------

    async def _run(self) -> None:
        if self._spill_pending:
            await asyncio.to_thread(self._replay_sync)
        while True:
            retry = self.flush_interval_s if self._spill_pending else None
            try:
                first = await asyncio.wait_for(self._queue.get(), retry)
            except TimeoutError:  # idle with a spill file: try the store again
                await asyncio.to_thread(self._replay_sync)
                continue
            batch = [first]
            deadline = asyncio.get_running_loop().time() + self.flush_interval_s
            while len(batch) < self.batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                wait = deadline - asyncio.get_running_loop().time()
                if wait <= 0 or self._closed:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), wait))
                except TimeoutError:
                    break
            self.metrics.queue_depth.set(self._queue.qsize())
            try:
                await asyncio.to_thread(self._write_sync, batch)
            except Exception as e:  # noqa: BLE001 - a bug must not stop the writer
                log.error("shadow.writer.failed", records=len(batch), error=repr(e))
            finally:
                for _ in batch:
                    self._queue.task_done()

    # --- the worker thread: every record it is given is counted exactly once ---------------------

    def _write_sync(self, batch: list[Record]) -> None:
        try:
            self.store.write_batch(batch)
        except Exception as e:  # noqa: BLE001 - any store failure: what fails alone spills
            log.warning("shadow.store.write_failed", records=len(batch), error=repr(e))
            stored, failed = self._one_by_one(batch)
            self._count("records", "stored", stored)
            self._spill_sync(failed)
            return
        self._count("records", "stored", batch)
        if self._spill_pending:
            self._replay_sync()

    def _one_by_one(self, batch: list[Record]) -> tuple[list[Record], list[Record]]:
        """After `batch` failed as a whole: each record alone, so that a poison record costs
        only itself; (stored, failed). When the first two fail alone as well, the store is
        down, and the rest are not tried."""
        if len(batch) == 1:
            return [], list(batch)
        stored: list[Record] = []
        failed: list[Record] = []
        for record in batch:
            if len(failed) >= 2 and not stored:
                failed.append(record)
                continue
            try:
                self.store.write_batch([record])
                stored.append(record)
            except Exception as e:  # noqa: BLE001 - this record (or the store) failed
                log.warning("shadow.store.record_failed", id=_id(record), error=repr(e)[:300])
                failed.append(record)
        return stored, failed

    def _count(self, metric: str, label: str, items: Sequence[Record]) -> None:
        kinds = collections.Counter(map(_kind, items))
        key = "outcome" if metric == "records" else "reason"
        for kind, n in kinds.items():
            getattr(self.metrics, metric).labels(kind=kind, **{key: label}).inc(n)
        if metric == "dropped" and self._on_drop is not None:
            for item in items:
                self._on_drop(item, label)

    def _spill_sync(self, batch: list[Record]) -> None:
        lines, kept = [], []
        for record in batch:
            try:
                lines.append((spill_line(record) + "\n").encode())  # fails alone, if at all
                kept.append(record)
            except (TypeError, ValueError) as e:
                self._count("dropped", "invalid", [record])
                log.error("shadow.record.dropped", id=_id(record), reason="invalid",
                          error=repr(e))
        if not lines:
            return
        try:
            with self._files:
                held = sum(p.stat().st_size for p in (self.spill_path, self.replaying_path)
                           if p.exists())
                # the disk is not the store's backlog
                if held + sum(map(len, lines)) > self.max_spill_bytes:
                    self._count("dropped", "spill_full", kept)
                    log.error("shadow.spill.full", records=len(kept), held_bytes=held,
                              max_bytes=self.max_spill_bytes)
                    return
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                new = not self.spill_path.exists()
                fd = os.open(self.spill_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with open(fd, "ab") as f:  # owner-only: it holds text
                    f.write(b"".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
                if new:
                    _fsync_dir(self.spill_dir)
                self._spill_pending = True
        except Exception as e:  # noqa: BLE001 - the spill failed too: count, never raise
            self._count("dropped", "store_error", kept)
            log.error("shadow.spill.failed", records=len(lines), path=str(self.spill_path),
                      error=repr(e))
            return
        self._count("records", "spilled", kept)

    def _replay_sync(self) -> None:
        """Write the spill files into the store; on a failure they stay for the next try.

        The spill file is first renamed to the replaying file (atomic), so new spills start a
        new file; the replaying file is removed only after all of it is stored. A crash in
        between replays it again, which idempotent writes make harmless.
        """
        try:
            with self._files:
                while True:
                    if not self.replaying_path.exists():
                        if not self.spill_path.exists():
                            break
                        os.replace(self.spill_path, self.replaying_path)
                        _fsync_dir(self.spill_dir)
                    self._replay_file(self.replaying_path)
                    os.unlink(self.replaying_path)
                    _fsync_dir(self.spill_dir)
                self._spill_pending = False
        except Exception as e:  # noqa: BLE001 - the files stay for the next try
            log.warning("shadow.spill.replay_failed", path=str(self.replaying_path),
                        error=repr(e))

    def _replay_file(self, path: Path) -> None:
        replayed: list[Record] = []
        corrupt = 0
        with open(path, encoding="utf-8") as f:
            batch: list[Record] = []
            for line in f:
                try:
                    batch.append(from_spill_line(line))
                except (ValueError, TypeError, KeyError):
                    corrupt += 1  # the line is not logged: it holds prompt and answer text
                    log.error("shadow.spill.corrupt_line", path=str(path), length=len(line))
                    continue
                if len(batch) == self.batch_size:
                    replayed, batch = replayed + self._replay_batch(batch), []
            replayed += self._replay_batch(batch)
        # Counted once the whole file is stored: a retried file is not counted twice. A torn
        # line cannot say what it was; it counts as a pair (responses are the cheaper loss).
        self._count("records", "replayed", replayed)
        self.metrics.dropped.labels(kind="pair", reason="spill_corrupt").inc(corrupt)


    def _replay_batch(self, batch: list[Record]) -> list[Record]:
        """Store a batch read back from a spill file; what is stored. A record that fails
        alone while others are stored is dropped (counted as invalid) so that it cannot hold
        up the file; when none can be stored, the store is down: raise, the file stays."""
        try:
            self.store.write_batch(batch)
            return batch
        except Exception:
            stored, failed = self._one_by_one(batch)
            if not stored:
                raise
        self._count("dropped", "invalid", failed)
        for record in failed:
            log.error("shadow.record.dropped", id=_id(record), reason="invalid")
        return stored


def _kind(record: Record) -> str:
    return "response" if isinstance(record, ResponseRecord) else "pair"


def _id(record: Record) -> str:
    return record.response_id if isinstance(record, ResponseRecord) else record.pair_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
