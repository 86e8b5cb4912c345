"""`SqliteStore`: the embedded default store, pairs in one WAL-mode SQLite file, and its
schema migrations."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from shadow.labels import Label
from shadow.records import ROW_COLUMNS, FeedbackRecord, PairRecord, ResponseRecord
from shadow.review_queries import SQLITE
from shadow.store import sql as shared
from shadow.store.base import Record

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
_INSERT_RESPONSE = (
    f"INSERT INTO responses ({', '.join(shared.RESPONSE_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in shared.RESPONSE_COLUMNS)}) ON CONFLICT DO NOTHING"
)
_INSERT_FEEDBACK = (
    f"INSERT INTO feedback ({', '.join(shared.FEEDBACK_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in shared.FEEDBACK_COLUMNS)}) ON CONFLICT DO NOTHING"
)


class SqliteStore(shared.ReviewReads):
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
        pairs, responses = shared.split_batch(records)  # serialise before taking the write lock
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
        sql, params = shared.pairs_query("?", route=route, since=since, until=until,
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
                f"SELECT {', '.join(shared.RESPONSE_COLUMNS)} FROM responses WHERE response_id = ?",
                (response_id,)).fetchone()
        return None if row is None else ResponseRecord(*row)

    def add_feedback(self, feedback: FeedbackRecord) -> None:
        with contextlib.closing(self._connect()) as conn:
            conn.execute(_INSERT_FEEDBACK, shared.feedback_row(feedback))

    def iter_feedback(self, *, since: str | None = None) -> Iterator[FeedbackRecord]:
        sql = f"SELECT {', '.join(shared.FEEDBACK_COLUMNS)} FROM feedback"
        params: list = []
        if since is not None:
            sql += " WHERE created_at >= ?"
            params.append(since)
        with contextlib.closing(self._connect()) as conn:
            cursor = conn.execute(sql + " ORDER BY created_at, feedback_id", params)
            while rows := cursor.fetchmany(500):
                yield from map(shared.feedback_from_row, rows)

    def add_label(self, label: Label) -> bool:
        with contextlib.closing(self._connect()) as conn:
            return conn.execute(shared.insert_label_sql("?"), shared.label_params(label)).rowcount == 1

    def iter_labels(self) -> Iterator[Label]:
        with contextlib.closing(self._connect()) as conn:
            cursor = conn.execute(f"SELECT {', '.join(shared.LABEL_COLUMNS)} FROM labels "
                                  "ORDER BY created_at, label_id")
            while rows := cursor.fetchmany(500):
                yield from (Label(*r) for r in rows)

    def _rows(self, sql: str, params: Sequence) -> list[tuple]:
        with contextlib.closing(self._connect()) as conn:
            return conn.execute(sql, list(params)).fetchall()
