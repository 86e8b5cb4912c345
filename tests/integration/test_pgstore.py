"""PostgresStore on a real PostgreSQL server (tests/pg.py): the SqliteStore behaviours, several
nodes migrating at once, and a PairWriter that spills while the server is down and replays
everything once it is back. Each test gets its own fresh database."""

from __future__ import annotations

import itertools
import threading

import psycopg
import pytest

from core.metrics import ShadowMetrics
from shadow.records import Answer, FeedbackRecord
from shadow.store import PairWriter
from shadow.store.postgres import MIGRATIONS, SCHEMA_TABLE, PostgresStore
from tests.pg import INSTALL_HINT, PgServer, find_bin_dir
from tests.unit.test_records import make_record
from tests.unit.test_store import assert_nothing_lost, counts, records, responses, until

pytestmark = pytest.mark.integration

_databases = itertools.count()


@pytest.fixture(scope="module")
def pg():
    if find_bin_dir() is None:
        pytest.fail(f"PostgreSQL is not installed (no initdb on PATH or in "
                    f"/usr/lib/postgresql/*/bin): {INSTALL_HINT}")
    server = PgServer.create()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def dsn(pg) -> str:
    """A fresh, empty database on the shared server."""
    if not pg.running:  # a failed test left it stopped
        pg.start()
    name = f"t{next(_databases)}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.dsn(name)


def sql(dsn: str, statement: str, params=()) -> list[tuple]:  # a second, independent client
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def tables(dsn: str) -> set[str]:
    rows = sql(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


# --- the store -------------------------------------------------------------------------------------


def test_round_trip_schema_and_filters(dsn):
    store = PostgresStore(dsn)
    batch = records(0, 12) + [make_record(99, route="other", scores={})]
    store.write_batch(batch)
    assert store.count() == 13
    assert store.get(batch[4].pair_id) == batch[4]
    assert store.get("nope") is None

    assert sql(dsn, "SELECT version FROM protege_schema ORDER BY version") == [(1,), (2,), (3,)]
    indexes = {r[0] for r in sql(dsn, "SELECT indexname FROM pg_indexes")}
    assert {"pairs_route_created", "pairs_disagreement", "feedback_created"} <= indexes

    assert [r.pair_id for r in store.iter_pairs()] == sorted(r.pair_id for r in batch)
    assert [r.route for r in store.iter_pairs(route="other")] == ["other"]
    since = batch[10].created_at
    assert [r.pair_id for r in store.iter_pairs(route="default", since=since)] == [
        batch[10].pair_id, batch[11].pair_id]
    high = list(store.iter_pairs(min_disagreement=0.75))  # i % 10 in (8, 9); unscored excluded
    assert sorted(r.pair_id for r in high) == [batch[i].pair_id for i in (8, 9)]
    assert len(list(store.iter_pairs(limit=5))) == 5
    got = list(store.iter_pairs(since=batch[1].created_at, until=batch[4].created_at))
    assert got == batch[1:4]  # until is exclusive
    assert list(store.iter_pairs(route="default", since=since, min_disagreement=0.05,
                                 limit=1)) == [batch[11]]


def test_values_jsonb_would_alter_survive_exactly(dsn):
    store = PostgresStore(dsn)
    student = Answer("smollm2-135m", "v3", "a NUL \x00 and é ✓", "stop", 12, 5, 41.5, 1.5e300)
    scores = {"disagreement": 0.1 * 3, "rouge_l": 1e-17, "big": 1.2345678901234567e300}
    odd = make_record(1, student=student, scores=scores)
    store.write_batch([odd])
    back = store.get(odd.pair_id)
    assert back == odd
    assert back.to_json() == odd.to_json()  # key order and number forms too
    assert back.scores["disagreement"] == 0.30000000000000004


def test_writes_are_idempotent_and_the_first_write_wins(dsn):
    store = PostgresStore(dsn)
    batch = records(0, 5)
    store.write_batch(batch)
    store.write_batch(batch + [batch[0]])  # a replay, with a duplicate inside the batch too
    store.write_batch([batch[1].with_scores({"disagreement": 0.99})])
    assert store.count() == 5
    assert store.get(batch[1].pair_id) == batch[1]


def test_a_batch_is_one_transaction(dsn):
    store = PostgresStore(dsn)
    store.count()  # creates the schema
    sql(dsn, """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'refused'; END $$""")
    sql(dsn, "CREATE TRIGGER refuse BEFORE INSERT ON pairs FOR EACH ROW "
             "WHEN (NEW.pair_id = 'chatcmpl-00002') EXECUTE FUNCTION refuse()")
    with pytest.raises(psycopg.errors.RaiseException, match="refused"):
        store.write_batch([*responses(0, 2), *records(0, 5)])  # the third pair fails
    assert store.count() == 0
    assert store.get_response(responses(0, 1)[0].response_id) is None  # nor any response
    sql(dsn, "DROP TRIGGER refuse ON pairs")
    store.write_batch(records(0, 5))
    assert store.count() == 5


def test_responses_and_feedback_round_trip(dsn):
    store = PostgresStore(dsn)
    rs = responses(0, 4)
    store.write_batch([*rs[:2], make_record(1), *rs[2:]])  # one batch, both kinds
    store.write_batch(rs[:1])  # idempotent
    assert store.count() == 1
    assert [store.get_response(r.response_id) for r in rs] == rs
    assert store.get_response("chatcmpl-nope") is None

    fb = [FeedbackRecord(f"fb-{i}", rs[i % 4], "thumbs_up" if i < 3 else "note",
                         float(i % 2) if i < 3 else None, None if i < 3 else "too long",
                         f"2026-11-28T23:00:0{i}.000000+00:00") for i in range(5)]
    for f in fb:
        store.add_feedback(f)
    store.add_feedback(fb[0])  # a retried request: kept once
    got = list(store.iter_feedback())
    assert [(g.feedback_id, g.metric, g.value, g.comment, g.response.response_id,
             g.response.variant, g.created_at) for g in got] == [
        (f.feedback_id, f.metric, f.value, f.comment, f.response.response_id, f.response.variant,
         f.created_at) for f in fb]
    assert [g.feedback_id for g in store.iter_feedback(since=fb[3].created_at)] == ["fb-3", "fb-4"]


def test_nodes_starting_at_once_migrate_once(dsn):
    stores = [PostgresStore(dsn) for _ in range(8)]
    barrier, errors, results = threading.Barrier(len(stores)), [], []

    def start(store: PostgresStore) -> None:
        try:
            barrier.wait(timeout=10)
            store.write_batch(records(0, 3))
            results.append(store.count())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert results == [3] * len(stores)
    assert sql(dsn, "SELECT version FROM protege_schema ORDER BY version") == [(1,), (2,), (3,)]
    assert tables(dsn) == {"protege_schema", "pairs", "responses", "feedback", "labels"}


def test_newer_schema_is_refused(dsn):
    sql(dsn, SCHEMA_TABLE)
    sql(dsn, "INSERT INTO protege_schema (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(RuntimeError, match="upgrade protege"):
        PostgresStore(dsn).count()
    assert tables(dsn) == {"protege_schema"}  # nothing migrated


def test_unreachable_server_raises_and_bad_dsn_is_refused(pg):
    with pytest.raises(psycopg.OperationalError):
        PostgresStore(f"postgresql://protege@127.0.0.1:{pg.port}/no_such_db").count()
    with pytest.raises(psycopg.ProgrammingError):
        PostgresStore("host=127.0.0.1 nonsense")


# --- PairWriter over PostgreSQL --------------------------------------------------------------------


async def test_writer_spills_while_the_server_is_down_and_replays_after(pg, dsn, tmp_path):
    store, m = PostgresStore(dsn, timeout_s=2), ShadowMetrics()
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=4, flush_interval_s=0.02)
    writer.start()
    try:
        for r in records(0, 5):
            writer.offer(r)
        await until(lambda: counts(m)["stored"] == 5)

        pg.stop()
        with pytest.raises(psycopg.OperationalError):  # writes fail while it is down
            store.write_batch(records(100, 1))
        for item in [*records(5, 10), *responses(0, 2)]:
            writer.offer(item)
        await until(lambda: counts(m)["spilled"] == 10 and counts(m, "response")["spilled"] == 2)
        assert counts(m)["replayed"] == 0
    finally:
        if not pg.running:
            pg.start()  # same port: the store reconnects on its next call

    await until(lambda: counts(m)["replayed"] == 10)  # the idle retry replays the spill file
    assert not writer.spill_path.exists() and not writer.replaying_path.exists()
    for r in records(15, 3):
        writer.offer(r)
    await writer.close()

    c = counts(m)
    assert c["stored"] + c["spilled"] == 18 and c["dropped"] == 0
    assert c["spilled"] == c["replayed"] == 10
    assert_nothing_lost(m, 18)
    assert store.count() == 18
    assert all(store.get(r.pair_id) == r for r in records(0, 18))
    assert [store.get_response(r.response_id) for r in responses(0, 2)] == responses(0, 2)
