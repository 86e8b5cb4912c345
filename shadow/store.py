"""Where pair records go: the `PairStore` interface, its SQLite backend, and `PairWriter`.

Owns durability: `SqliteStore` keeps pairs in one WAL-mode SQLite file (the embedded default;
a PostgreSQL backend implements the same `PairStore` protocol beside it), and `PairWriter`
moves records from the request side to a store in batches, off the event loop. Does not own
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
import dataclasses
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from ops.logging import get_logger
from ops.metrics import ShadowMetrics
from shadow.config import ShadowSettings
from shadow.labels import VERDICTS, Label
from shadow.records import (
    ROW_COLUMNS,
    FeedbackRecord,
    PairRecord,
    ResponseRecord,
    from_spill_line,
    spill_line,
)
from shadow.review import (
    SQLITE,
    Dialect,
    ReviewQuery,
    bucket_length,
    list_item,
    page_sql,
    summary,
    summary_sql,
    where_sql,
)

log = get_logger("shadow.store")


Record = PairRecord | ResponseRecord  # what a writer batches


class PairStore(Protocol):
    """What `PairWriter`, feedback and the ML team's tools need from a store. Methods block:
    call them from a thread (`asyncio.to_thread`), never on the event loop."""

    def write_batch(self, records: Sequence[Record]) -> None:
        """Write all records in one transaction, or none; an id already stored is skipped."""

    def count(self) -> int: ...

    def get(self, pair_id: str) -> PairRecord | None: ...

    def iter_pairs(
        self, *, route: str | None = None, since: str | None = None, until: str | None = None,
        min_disagreement: float | None = None, limit: int | None = None,
    ) -> Iterator[PairRecord]:
        """Pairs oldest first (`created_at`, then `pair_id`); `since` inclusive, `until` not."""

    def existing(self, pair_ids: Sequence[str]) -> set[str]:
        """Which of `pair_ids` are stored."""

    def get_response(self, response_id: str) -> ResponseRecord | None: ...

    def add_feedback(self, feedback: FeedbackRecord) -> None:
        """Store one piece of feedback (several per response and metric are kept)."""

    def iter_feedback(self, *, since: str | None = None) -> Iterator[FeedbackRecord]:
        """Feedback oldest first."""

    def feedback_for(self, response_id: str) -> list[FeedbackRecord]:
        """The feedback on one response (a pair's id is its response's), oldest first."""

    def add_label(self, label: Label) -> bool:
        """Store a reviewer's label; False (nothing stored) when the pair does not exist."""

    def labels_for(self, pair_id: str) -> list[Label]:
        """A pair's labels, newest first."""

    def iter_labels(self) -> Iterator[Label]:
        """Every label, oldest first (so the last one seen per pair is its current label)."""

    def review_page(self, query: ReviewQuery) -> dict:
        """The review page's list: `{"total", "page", "size", "sort", "items"}`."""

    def review_summary(self, query: ReviewQuery) -> dict:
        """The review page's summary panel over the filtered pairs (`shadow.review.summary`)."""

    def review_facets(self) -> dict:
        """The routes, student versions and feedback metrics the store holds."""


# --- SQLite ----------------------------------------------------------------------------------------

# MIGRATIONS[i] takes the schema from `user_version` i to i + 1. Append; never edit one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE pairs (
            pair_id TEXT PRIMARY KEY,
            route TEXT NOT NULL,
            variant TEXT NOT NULL,
            student_version TEXT,
            teacher TEXT NOT NULL,
            created_at TEXT NOT NULL,
            disagreement REAL,
            record TEXT NOT NULL
        )""",
        "CREATE INDEX pairs_route_created ON pairs (route, created_at)",
        "CREATE INDEX pairs_disagreement ON pairs (disagreement)",
    ),
    (
        """CREATE TABLE responses (
            response_id TEXT PRIMARY KEY,
            route TEXT NOT NULL,
            variant TEXT NOT NULL,
            version TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE feedback (
            feedback_id TEXT PRIMARY KEY,
            response_id TEXT NOT NULL,
            route TEXT NOT NULL,
            variant TEXT NOT NULL,
            version TEXT NOT NULL,
            metric TEXT NOT NULL,
            value REAL,
            comment TEXT,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX feedback_response ON feedback (response_id)",
        "CREATE INDEX feedback_created ON feedback (created_at)",
    ),
    (
        """CREATE TABLE labels (
            label_id TEXT PRIMARY KEY,
            pair_id TEXT NOT NULL,
            verdict TEXT NOT NULL,
            corrected TEXT,
            reviewer TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX labels_pair_created ON labels (pair_id, created_at)",
    ),
)

_INSERT = (
    f"INSERT INTO pairs ({', '.join(ROW_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in ROW_COLUMNS)}) ON CONFLICT (pair_id) DO NOTHING"
)
RESPONSE_COLUMNS = ("response_id", "route", "variant", "version", "created_at")
FEEDBACK_COLUMNS = ("feedback_id", "response_id", "route", "variant", "version", "metric",
                    "value", "comment", "created_at")
_INSERT_RESPONSE = (
    f"INSERT INTO responses ({', '.join(RESPONSE_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in RESPONSE_COLUMNS)}) ON CONFLICT DO NOTHING"
)
_INSERT_FEEDBACK = (
    f"INSERT INTO feedback ({', '.join(FEEDBACK_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in FEEDBACK_COLUMNS)}) ON CONFLICT DO NOTHING"
)


def split_batch(records: Sequence[Record]) -> tuple[list[dict], list[dict]]:
    """Rows for the pairs table and for the responses table (serialised before any lock)."""
    pairs, responses = [], []
    for r in records:
        if isinstance(r, ResponseRecord):
            responses.append(dataclasses.asdict(r))
        else:
            pairs.append(r.to_row())
    return pairs, responses


def pairs_query(mark: str, *, route: str | None, since: str | None, until: str | None,
                min_disagreement: float | None, limit: int | None) -> tuple[str, list]:
    """`PairStore.iter_pairs` as SQL and its parameters; `mark` is the driver's placeholder."""
    where, params = [], []
    for clause, value in (("route = ", route), ("created_at >= ", since),
                          ("created_at < ", until), ("disagreement >= ", min_disagreement)):
        if value is not None:
            where.append(clause + mark)
            params.append(value)
    sql = "SELECT record FROM pairs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at, pair_id"
    if limit is not None:
        sql += " LIMIT " + mark
        params.append(limit)
    return sql, params


LABEL_COLUMNS = ("label_id", "pair_id", "verdict", "corrected", "reviewer", "created_at")


def insert_label_sql(mark: str) -> str:
    """Insert a label only when its pair exists (parameters: the label's columns, then pair_id)."""
    return (f"INSERT INTO labels ({', '.join(LABEL_COLUMNS)}) "
            f"SELECT {', '.join([mark] * len(LABEL_COLUMNS))} "
            f"WHERE EXISTS (SELECT 1 FROM pairs WHERE pair_id = {mark})")


def label_params(label: Label) -> list:
    return [getattr(label, c) for c in LABEL_COLUMNS] + [label.pair_id]


class ReviewReads:
    """The review page's reads, for a store that runs SQL in `dialect` through `_rows`."""

    dialect: Dialect

    def _rows(self, sql: str, params: Sequence) -> list[tuple]:
        raise NotImplementedError

    def feedback_for(self, response_id: str) -> list[FeedbackRecord]:
        return [feedback_from_row(r) for r in self._rows(
            f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback WHERE response_id = "
            f"{self.dialect.mark} ORDER BY created_at, feedback_id", (response_id,))]

    def labels_for(self, pair_id: str) -> list[Label]:
        return [Label(*r) for r in self._rows(
            f"SELECT {', '.join(LABEL_COLUMNS)} FROM labels WHERE pair_id = {self.dialect.mark} "
            "ORDER BY created_at DESC, label_id DESC", (pair_id,))]

    def review_page(self, q: ReviewQuery) -> dict:
        d, rows = self.dialect, self._rows
        count_sql, page, params = page_sql(q, d)
        total = rows(count_sql, params)[0][0]
        pairs = [PairRecord.from_json(r[0]) for r in rows(page, [*params, q.size, q.offset])]
        ids = [p.pair_id for p in pairs]
        labels, counts = {}, {}
        if ids:
            marks = ", ".join([d.mark] * len(ids))
            for row in rows(f"SELECT {', '.join(LABEL_COLUMNS)} FROM labels WHERE pair_id IN "
                            f"({marks}) ORDER BY created_at, label_id", ids):
                labels[row[1]] = Label(*row)  # the newest wins
            counts = dict(rows(f"SELECT response_id, count(*) FROM feedback WHERE response_id "
                               f"IN ({marks}) GROUP BY response_id", ids))
        return {"total": total, "page": q.page, "size": q.size, "sort": q.sort,
                "items": [list_item(p, labels.get(p.pair_id), counts.get(p.pair_id, 0))
                          for p in pairs]}

    def review_summary(self, q: ReviewQuery) -> dict:
        params = where_sql(q, self.dialect)[2]
        totals = self._rows(summary_sql(q, self.dialect)["totals"], params)[0]
        name, prefix = bucket_length(totals[2], totals[3])
        sql = summary_sql(q, self.dialect, prefix)
        return summary(totals, *(self._rows(sql[k], params) for k in
                                 ("labels", "histogram", "routes", "versions", "series")), name)

    def review_facets(self) -> dict:
        def values(sql: str) -> list:
            return sorted((r[0] for r in self._rows(sql, ())),
                          key=lambda v: (v is None, v or ""))

        return {"routes": values("SELECT DISTINCT route FROM pairs"),
                "versions": values("SELECT DISTINCT student_version FROM pairs"),
                "metrics": values("SELECT DISTINCT metric FROM feedback"),
                "verdicts": list(VERDICTS)}


def feedback_row(f: FeedbackRecord) -> dict:
    return {"feedback_id": f.feedback_id, "response_id": f.response.response_id,
            "route": f.response.route, "variant": f.response.variant,
            "version": f.response.version, "metric": f.metric, "value": f.value,
            "comment": f.comment, "created_at": f.created_at}


def feedback_from_row(row: Sequence) -> FeedbackRecord:
    """A `FeedbackRecord` from a row in `FEEDBACK_COLUMNS` order."""
    fid, rid, route, variant, version, metric, value, comment, created = row
    return FeedbackRecord(fid, ResponseRecord(rid, route, variant, version, "-"), metric,
                          value, comment, created)


class SqliteStore(ReviewReads):
    """Pairs in one SQLite file (WAL, synchronous=NORMAL). Each call opens its own connection,
    so a file that was removed, replaced or unreachable fails that call (and the writer
    spills) instead of writing into a deleted file, and the store recovers with the file."""

    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = 5.0):
        if str(path) in ("", ":memory:"):
            raise ValueError(f"SqliteStore needs a file path, got {str(path)!r}: an in-memory "
                             "database would lose every pair; pass e.g. 'data/pairs.db'")
        self.path = Path(path)
        self.timeout_s = timeout_s  # how long a write waits for another writer's lock
        self.dialect = SQLITE

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():  # created owner-only; SQLite gives -wal and -shm its mode
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                               check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":  # set once per file (it persists); setting it takes a lock
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(
                    f"{self.path}: journal_mode is {mode!r}, not 'wal'; put the store on a local "
                    "file system that supports WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        target = len(MIGRATIONS)
        if conn.execute("PRAGMA user_version").fetchone()[0] == target:
            return
        conn.execute("BEGIN IMMEDIATE")  # one migrator at a time; re-read under the lock
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > target:
                raise RuntimeError(f"{self.path} has schema version {version}, newer than this "
                                   f"protege's {target}: upgrade protege")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def write_batch(self, records: Sequence[Record]) -> None:
        pairs, responses = split_batch(records)  # serialise before taking the write lock
        if not (pairs or responses):
            return
        with contextlib.closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, pairs)
                conn.executemany(_INSERT_RESPONSE, responses)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def count(self) -> int:
        with contextlib.closing(self._connect()) as conn:
            return conn.execute("SELECT count(*) FROM pairs").fetchone()[0]

    def get(self, pair_id: str) -> PairRecord | None:
        with contextlib.closing(self._connect()) as conn:
            row = conn.execute("SELECT record FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone()
        return None if row is None else PairRecord.from_json(row[0])

    def iter_pairs(
        self, *, route: str | None = None, since: str | None = None, until: str | None = None,
        min_disagreement: float | None = None, limit: int | None = None,
    ) -> Iterator[PairRecord]:
        sql, params = pairs_query("?", route=route, since=since, until=until,
                                  min_disagreement=min_disagreement, limit=limit)
        with contextlib.closing(self._connect()) as conn:
            cursor = conn.execute(sql, params)
            while rows := cursor.fetchmany(500):
                for (text,) in rows:
                    yield PairRecord.from_json(text)

    def existing(self, pair_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with contextlib.closing(self._connect()) as conn:
            for i in range(0, len(pair_ids), 500):
                chunk = list(pair_ids[i:i + 500])
                marks = ", ".join("?" * len(chunk))
                found.update(r[0] for r in conn.execute(
                    f"SELECT pair_id FROM pairs WHERE pair_id IN ({marks})", chunk))
        return found

    def get_response(self, response_id: str) -> ResponseRecord | None:
        with contextlib.closing(self._connect()) as conn:
            row = conn.execute(
                f"SELECT {', '.join(RESPONSE_COLUMNS)} FROM responses WHERE response_id = ?",
                (response_id,)).fetchone()
        return None if row is None else ResponseRecord(*row)

    def add_feedback(self, feedback: FeedbackRecord) -> None:
        with contextlib.closing(self._connect()) as conn:
            conn.execute(_INSERT_FEEDBACK, feedback_row(feedback))

    def iter_feedback(self, *, since: str | None = None) -> Iterator[FeedbackRecord]:
        sql = f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback"
        params: list = []
        if since is not None:
            sql += " WHERE created_at >= ?"
            params.append(since)
        with contextlib.closing(self._connect()) as conn:
            cursor = conn.execute(sql + " ORDER BY created_at, feedback_id", params)
            while rows := cursor.fetchmany(500):
                yield from map(feedback_from_row, rows)

    def add_label(self, label: Label) -> bool:
        with contextlib.closing(self._connect()) as conn:
            return conn.execute(insert_label_sql("?"), label_params(label)).rowcount == 1

    def iter_labels(self) -> Iterator[Label]:
        with contextlib.closing(self._connect()) as conn:
            cursor = conn.execute(f"SELECT {', '.join(LABEL_COLUMNS)} FROM labels "
                                  "ORDER BY created_at, label_id")
            while rows := cursor.fetchmany(500):
                yield from (Label(*r) for r in rows)

    def _rows(self, sql: str, params: Sequence) -> list[tuple]:
        with contextlib.closing(self._connect()) as conn:
            return conn.execute(sql, list(params)).fetchall()


def open_store(settings: ShadowSettings, root: Path) -> PairStore:
    """The store `settings` names: SQLite at `store_path` (relative to `root`), or PostgreSQL
    at the DSN in the environment variable `postgres_dsn_env`."""
    if settings.store == "postgres":
        dsn = os.environ.get(settings.postgres_dsn_env, "")
        if not dsn:
            raise ValueError(f"shadow.store is postgres but ${settings.postgres_dsn_env} is not "
                             "set: export it as postgresql://USER:PASSWORD@HOST:PORT/DB")
        from shadow.pgstore import PostgresStore

        return PostgresStore(dsn)
    path = root / settings.store_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(path)


# --- the writer ------------------------------------------------------------------------------------


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
                if held + sum(map(len, lines)) > self.max_spill_bytes:  # the disk is not the store's backlog
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
