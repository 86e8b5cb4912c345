"""`PostgresStore`: the `PairStore` on PostgreSQL, for several gateway nodes sharing one store.

Owns the PostgreSQL schema, its migrations (one migrator at a time across nodes) and the SQL;
what a record holds, and the `PairWriter` that batches and spills, live in `shadow.records` and
`shadow.store.writer`. Same tables and semantics as `SqliteStore`.

`record` is `text` holding the record's JSON, not `jsonb`: jsonb refuses `\\u0000` in strings (a
NUL in a model's answer would fail its batch on every replay) and turns a float such as 1.5e300
into a different integer, which would break `store.get(id) == record`. Ad-hoc queries can cast
`record::jsonb` (rows holding a NUL excepted).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict

from shadow.labels import Label
from shadow.records import ROW_COLUMNS, FeedbackRecord, PairRecord, ResponseRecord
from shadow.review_queries import POSTGRES
from shadow.store import sql as shared
from shadow.store.base import Record

# MIGRATIONS[i] takes the schema from version i to i + 1, as SQLite's do. Append; never edit one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE pairs (
            pair_id text COLLATE "C" PRIMARY KEY,
            route text NOT NULL,
            variant text NOT NULL,
            student_version text,
            teacher text NOT NULL,
            created_at text COLLATE "C" NOT NULL,
            disagreement double precision,
            record text NOT NULL
        )""",
        "CREATE INDEX pairs_route_created ON pairs (route, created_at)",
        "CREATE INDEX pairs_disagreement ON pairs (disagreement)",
    ),
    (
        """CREATE TABLE responses (
            response_id text PRIMARY KEY,
            route text NOT NULL,
            variant text NOT NULL,
            version text NOT NULL,
            created_at text COLLATE "C" NOT NULL
        )""",
        """CREATE TABLE feedback (
            feedback_id text COLLATE "C" PRIMARY KEY,
            response_id text NOT NULL,
            route text NOT NULL,
            variant text NOT NULL,
            version text NOT NULL,
            metric text NOT NULL,
            value double precision,
            comment text,
            created_at text COLLATE "C" NOT NULL
        )""",
        "CREATE INDEX feedback_response ON feedback (response_id)",
        "CREATE INDEX feedback_created ON feedback (created_at)",
    ),
    (
        """CREATE TABLE labels (
            label_id text COLLATE "C" PRIMARY KEY,
            pair_id text COLLATE "C" NOT NULL,
            verdict text NOT NULL,
            corrected text,
            reviewer text NOT NULL,
            created_at text COLLATE "C" NOT NULL
        )""",
        "CREATE INDEX labels_pair_created ON labels (pair_id, created_at)",
    ),
)
# One row per applied migration; the schema's version is the highest.
SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS protege_schema (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
MIGRATION_LOCK = 0x70726F74656765  # pg_advisory_xact_lock key: "protege" in ASCII


def _insert(table: str, columns: Sequence[str]) -> str:
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(f'%({c})s' for c in columns)}) ON CONFLICT DO NOTHING")


_INSERT_PAIR = _insert("pairs", ROW_COLUMNS)
_INSERT_RESPONSE = _insert("responses", shared.RESPONSE_COLUMNS)
_INSERT_FEEDBACK = _insert("feedback", shared.FEEDBACK_COLUMNS)


class PostgresStore(shared.ReviewReads):
    """Pairs in PostgreSQL. Each call opens its own connection (`timeout_s` bounds connecting
    and a write's wait for a lock), so a server that goes down fails the calls (the writer
    spills) and the store works again once it is back, without a restart. Thread-safe.
    Ids and `created_at` use the "C" collation: ordered and compared bytewise, as in SQLite."""

    def __init__(self, dsn: str, *, timeout_s: float = 5.0):
        if timeout_s <= 0:
            raise ValueError(f"PostgresStore needs timeout_s > 0, got {timeout_s}")
        conninfo_to_dict(dsn)  # a malformed DSN fails here, at startup, not on every write
        self.dsn, self.timeout_s = dsn, timeout_s
        self.dialect = POSTGRES
        self._lock_timeout = f"{int(timeout_s * 1000)}ms"

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn, autocommit=True,
                               connect_timeout=max(2, math.ceil(self.timeout_s)))  # libpq: >= 2
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: psycopg.Connection) -> None:
        target = len(MIGRATIONS)
        try:
            if conn.execute("SELECT max(version) FROM protege_schema").fetchone()[0] == target:
                return
        except errors.UndefinedTable:
            pass  # a new database
        with conn.transaction():  # one migrator at a time, across nodes; re-read under the lock
            conn.execute("SELECT set_config('lock_timeout', %s, true), pg_advisory_xact_lock(%s)",
                         (self._lock_timeout, MIGRATION_LOCK))
            conn.execute(SCHEMA_TABLE)
            version = conn.execute(
                "SELECT coalesce(max(version), 0) FROM protege_schema").fetchone()[0]
            if version > target:
                raise RuntimeError(f"the PostgreSQL store has schema version {version}, newer "
                                   f"than this protege's {target}: upgrade protege")
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO protege_schema (version) VALUES (%s)", (number,))

    def write_batch(self, records: Sequence[Record]) -> None:
        pairs, responses = shared.split_batch(records)  # serialise before connecting
        if not (pairs or responses):
            return
        with self._connect() as conn, conn.transaction(), conn.cursor() as cur:
            # A pair_id another node is inserting right now waits for its commit, boundedly.
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (self._lock_timeout,))
            if pairs:
                cur.executemany(_INSERT_PAIR, pairs)
            if responses:
                cur.executemany(_INSERT_RESPONSE, responses)

    def count(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT count(*) FROM pairs").fetchone()[0]

    def get(self, pair_id: str) -> PairRecord | None:
        with self._connect() as conn:
            row = conn.execute("SELECT record FROM pairs WHERE pair_id = %s",
                               (pair_id,)).fetchone()
        return None if row is None else PairRecord.from_json(row[0])

    def iter_pairs(
        self, *, route: str | None = None, since: str | None = None, until: str | None = None,
        min_disagreement: float | None = None, limit: int | None = None,
    ) -> Iterator[PairRecord]:
        sql, params = shared.pairs_query("%s", route=route, since=since, until=until,
                                  min_disagreement=min_disagreement, limit=limit)
        for (text,) in self._stream(sql, params):
            yield PairRecord.from_json(text)

    def _stream(self, sql: str, params: Sequence) -> Iterator[tuple]:
        """Rows through a server-side cursor, 500 at a time: an export never loads it all."""
        with self._connect() as conn, conn.transaction(), conn.cursor(name="protege") as cur:
            cur.itersize = 500
            cur.execute(sql, params)
            yield from cur

    def existing(self, pair_ids: Sequence[str]) -> set[str]:
        with self._connect() as conn:
            rows = conn.execute("SELECT pair_id FROM pairs WHERE pair_id = ANY(%s)",
                                (list(pair_ids),)).fetchall()
        return {r[0] for r in rows}

    def get_response(self, response_id: str) -> ResponseRecord | None:
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT {', '.join(shared.RESPONSE_COLUMNS)} FROM responses WHERE response_id = %s",
                (response_id,)).fetchone()
        return None if row is None else ResponseRecord(*row)

    def add_feedback(self, feedback: FeedbackRecord) -> None:
        with self._connect() as conn:
            conn.execute(_INSERT_FEEDBACK, shared.feedback_row(feedback))

    def iter_feedback(self, *, since: str | None = None) -> Iterator[FeedbackRecord]:
        sql = f"SELECT {', '.join(shared.FEEDBACK_COLUMNS)} FROM feedback"
        params: list = []
        if since is not None:
            sql += " WHERE created_at >= %s"
            params.append(since)
        yield from map(shared.feedback_from_row,
                       self._stream(sql + " ORDER BY created_at, feedback_id", params))

    def add_label(self, label: Label) -> bool:
        with self._connect() as conn:
            return conn.execute(shared.insert_label_sql("%s"), shared.label_params(label)).rowcount == 1

    def iter_labels(self) -> Iterator[Label]:
        sql = f"SELECT {', '.join(shared.LABEL_COLUMNS)} FROM labels ORDER BY created_at, label_id"
        yield from (Label(*r) for r in self._stream(sql, ()))

    def _rows(self, sql: str, params: Sequence) -> list[tuple]:
        with self._connect() as conn:
            return conn.execute(sql, list(params)).fetchall()
