"""SqliteStore on real files, and PairWriter's promise: every record offered is stored, or
spilled and later replayed, or counted as dropped; never lost silently, never stored twice."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3

import pytest

from core.metrics import ShadowMetrics
from shadow.records import PairRecord
from shadow.store import PairWriter, SqliteStore
from shadow.store.sqlite import MIGRATIONS
from tests.unit.test_records import make_record


def records(start: int, n: int) -> list[PairRecord]:
    return [make_record(i) for i in range(start, start + n)]


def counts(m: ShadowMetrics, kind: str = "pair") -> dict[str, float]:
    out = {o: m.registry.get_sample_value("protege_shadow_records_total",
                                          {"kind": kind, "outcome": o})
           for o in ShadowMetrics.OUTCOMES}
    out["dropped"] = sum(
        m.registry.get_sample_value("protege_shadow_dropped_total", {"kind": kind, "reason": r})
        for r in ShadowMetrics.DROP_REASONS)
    return out


def dropped(m: ShadowMetrics, reason: str, kind: str = "pair") -> float:
    return m.registry.get_sample_value("protege_shadow_dropped_total",
                                       {"kind": kind, "reason": reason})


async def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def assert_nothing_lost(m: ShadowMetrics, offered: int) -> None:
    c = counts(m)
    assert c["stored"] + c["spilled"] + c["dropped"] == offered, c


def break_store(path) -> None:
    """Move the database away and put a directory where it was: every open now fails."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.replace(f"{path}{suffix}", f"{path}{suffix}.away")
    os.mkdir(path)


def fix_store(path) -> None:
    os.rmdir(path)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}.away"):
            os.replace(f"{path}{suffix}.away", f"{path}{suffix}")


# --- SqliteStore -----------------------------------------------------------------------------------


def test_round_trip_schema_and_filters(tmp_path):
    store = SqliteStore(tmp_path / "pairs.db")
    batch = records(0, 12) + [make_record(99, route="other", scores={})]
    store.write_batch(batch)
    assert store.count() == 13
    assert store.get(batch[4].pair_id) == batch[4]
    assert store.get("nope") is None

    with sqlite3.connect(tmp_path / "pairs.db") as conn:  # a second, independent connection
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"pairs_route_created", "pairs_disagreement"} <= indexes

    assert [r.pair_id for r in store.iter_pairs()] == sorted(r.pair_id for r in batch)
    assert [r.route for r in store.iter_pairs(route="other")] == ["other"]
    since = batch[10].created_at
    assert [r.pair_id for r in store.iter_pairs(route="default", since=since)] == [
        batch[10].pair_id, batch[11].pair_id]
    high = list(store.iter_pairs(min_disagreement=0.75))  # i % 10 in (8, 9); unscored excluded
    assert sorted(r.pair_id for r in high) == [batch[i].pair_id for i in (8, 9)]
    assert len(list(store.iter_pairs(limit=5))) == 5


def test_writes_are_idempotent_and_the_first_write_wins(tmp_path):
    store = SqliteStore(tmp_path / "pairs.db")
    batch = records(0, 5)
    store.write_batch(batch)
    store.write_batch(batch + [batch[0]])  # a replay, with a duplicate inside the batch too
    rescored = batch[1].with_scores({"disagreement": 0.99})
    store.write_batch([rescored])
    assert store.count() == 5
    assert store.get(batch[1].pair_id) == batch[1]


def test_a_batch_is_one_transaction(tmp_path):
    store = SqliteStore(tmp_path / "pairs.db")
    store.count()  # creates the schema
    with sqlite3.connect(tmp_path / "pairs.db") as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON pairs WHEN NEW.pair_id = "
                     "'chatcmpl-00002' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        store.write_batch(records(0, 5))  # the third record fails: none may be written
    assert store.count() == 0
    with sqlite3.connect(tmp_path / "pairs.db") as conn:
        conn.execute("DROP TRIGGER refuse")
    store.write_batch(records(0, 5))
    assert store.count() == 5


def test_newer_schema_and_memory_are_refused(tmp_path):
    with sqlite3.connect(tmp_path / "new.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="upgrade protege"):
        SqliteStore(tmp_path / "new.db").count()
    with pytest.raises(ValueError, match="file path"):
        SqliteStore(":memory:")


def test_unavailable_store_raises(tmp_path):
    (tmp_path / "pairs.db").mkdir()
    with pytest.raises(sqlite3.OperationalError):
        SqliteStore(tmp_path / "pairs.db").write_batch(records(0, 1))


# --- PairWriter ------------------------------------------------------------------------------------


async def test_close_drains_in_batches(tmp_path):
    store, m = SqliteStore(tmp_path / "pairs.db"), ShadowMetrics()
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=10, flush_interval_s=30)
    writer.start()
    assert all(writer.offer(r) for r in records(0, 25))
    await writer.close(timeout_s=10)
    assert store.count() == 25
    assert counts(m)["stored"] == 25
    assert m.registry.get_sample_value("protege_shadow_queue_depth") == 0
    assert_nothing_lost(m, 25)
    assert not writer.offer(make_record(100))  # after close: refused and counted
    assert dropped(m, "closed") == 1
    assert_nothing_lost(m, 26)


async def test_flushes_after_the_interval_without_close(tmp_path):
    store, m = SqliteStore(tmp_path / "pairs.db"), ShadowMetrics()
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=100, flush_interval_s=0.02)
    writer.start()
    for r in records(0, 3):
        writer.offer(r)
    await until(lambda: counts(m)["stored"] == 3)
    assert store.count() == 3
    await writer.close()


async def test_full_queue_drops_and_counts_without_waiting(tmp_path):
    store, m = SqliteStore(tmp_path / "pairs.db"), ShadowMetrics()
    writer = PairWriter(store, m, tmp_path / "spill", maxsize=5, flush_interval_s=0.02)
    # Not started: nothing drains, so the queue fills; offer must return at once regardless.
    accepted = [writer.offer(r) for r in records(0, 8)]
    assert accepted == [True] * 5 + [False] * 3
    assert dropped(m, "queue_full") == 3
    assert m.registry.get_sample_value("protege_shadow_queue_depth") == 5
    writer.start()
    await writer.close()
    assert store.count() == 5
    assert_nothing_lost(m, 8)


async def test_spills_while_the_store_is_down_and_replays_when_idle(tmp_path):
    db = tmp_path / "pairs.db"
    store, m = SqliteStore(db), ShadowMetrics()
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=4, flush_interval_s=0.02)
    writer.start()
    for r in records(0, 5):
        writer.offer(r)
    await until(lambda: counts(m)["stored"] == 5)

    break_store(db)
    for r in records(5, 10):
        writer.offer(r)
    await until(lambda: counts(m)["spilled"] == 10)
    assert len(writer.spill_path.read_text().splitlines()) == 10
    assert counts(m)["replayed"] == 0

    fix_store(db)  # no new records: the idle retry replays the spill file
    await until(lambda: counts(m)["replayed"] == 10)
    assert not writer.spill_path.exists() and not writer.replaying_path.exists()
    for r in records(15, 3):
        writer.offer(r)
    await writer.close()

    c = counts(m)
    assert store.count() == 18
    assert all(store.get(r.pair_id) == r for r in records(0, 18))
    assert c["stored"] + c["replayed"] == 18 - c["dropped"]
    assert c["spilled"] == c["replayed"] == 10
    assert_nothing_lost(m, 18)


async def test_a_successful_write_replays_the_spill_file(tmp_path):
    db = tmp_path / "pairs.db"
    store, m = SqliteStore(db), ShadowMetrics()
    # A long interval: batches go out when full, and the idle retry never fires in this test.
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=5, flush_interval_s=60)
    writer.start()
    break_store(db)
    for r in records(0, 10):
        writer.offer(r)
    await until(lambda: counts(m)["spilled"] == 10)
    fix_store(db)  # the db never existed: a fresh file is created with its schema
    for r in records(10, 5) + records(0, 5):  # five new records and five replayed twice
        writer.offer(r)
    await until(lambda: counts(m)["replayed"] == 10)
    await writer.close()
    assert store.count() == 15
    c = counts(m)
    assert c["stored"] == 10 and c["spilled"] == 10 and c["dropped"] == 0


async def test_spill_failure_is_counted_as_store_error(tmp_path):
    db = tmp_path / "pairs.db"
    store, m = SqliteStore(db), ShadowMetrics()
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=2, flush_interval_s=0.02)
    writer.start()
    db.mkdir()
    writer.spill_path.mkdir()  # the spill file cannot be opened either
    for r in records(0, 4):
        writer.offer(r)
    await until(lambda: dropped(m, "store_error") == 4)
    await writer.close()
    assert_nothing_lost(m, 4)


async def test_an_unserialisable_record_is_dropped_alone(tmp_path):
    store, m = SqliteStore(tmp_path / "pairs.db"), ShadowMetrics()
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=3, flush_interval_s=0.02)
    writer.start()
    bad = make_record(1, request={"messages": {"not", "json"}})  # a set: JSON cannot hold it
    for r in (make_record(0), bad, make_record(2)):
        writer.offer(r)
    await until(lambda: counts(m)["stored"] == 2)  # the batch failed; alone, the others pass
    assert dropped(m, "invalid") == 1
    await writer.close()
    assert store.count() == 2
    assert_nothing_lost(m, 3)


def refuse(db, pair_id: str) -> None:
    """Make the store refuse one record (as a poison row would be refused), and only it."""
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON pairs WHEN NEW.pair_id = "
                     f"'{pair_id}' BEGIN SELECT RAISE(ABORT, 'refused'); END")


async def test_a_poison_record_costs_only_itself(tmp_path):
    db = tmp_path / "pairs.db"
    store, m = SqliteStore(db), ShadowMetrics()
    store.count()
    refuse(db, "chatcmpl-00002")
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=5, flush_interval_s=0.02)
    writer.start()
    unstorable = make_record(7, request={"prompt": "lone \ud800 surrogate"})  # not UTF-8
    for r in [*records(0, 5), unstorable]:
        writer.offer(r)
    await until(lambda: counts(m)["stored"] == 4 and dropped(m, "invalid") == 1)
    assert counts(m)["spilled"] == 1  # the refused one waits in the spill file
    assert store.count() == 4 and store.get("chatcmpl-00002") is None
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER refuse")
    await until(lambda: counts(m)["replayed"] == 1)  # refused alone: it stayed for the retry
    await writer.close()
    assert store.count() == 5
    assert_nothing_lost(m, 6)


async def test_a_spilled_record_the_store_refuses_alone_does_not_hold_up_the_file(tmp_path):
    db = tmp_path / "pairs.db"
    store, m = SqliteStore(db), ShadowMetrics()
    store.count()
    refuse(db, "chatcmpl-00001")
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "pairs.spill.jsonl").write_text("".join(r.to_json() + "\n" for r in records(0, 3)))
    writer = PairWriter(store, m, spill, batch_size=3, flush_interval_s=0.01)
    writer.start()
    await until(lambda: counts(m)["replayed"] == 2)
    await writer.close()
    assert dropped(m, "invalid") == 1 and store.count() == 2
    assert not any(spill.glob("*.jsonl"))


async def test_close_spills_what_it_cannot_write_and_a_new_writer_replays_it(tmp_path):
    db = tmp_path / "pairs.db"
    store, m = SqliteStore(db, timeout_s=0.05), ShadowMetrics()
    store.count()  # creates the file, in WAL mode, and its schema
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: "locked"
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=2, flush_interval_s=0.01)
    writer.start()
    for r in records(0, 10):
        writer.offer(r)
    await writer.close(timeout_s=0.01)  # the deadline passes with records still queued
    await until(lambda: counts(m)["spilled"] == 10)  # the in-flight batch accounts for itself
    assert store.count() == 0  # readers are not blocked by the writer's lock (WAL)
    assert_nothing_lost(m, 10)
    blocker.execute("ROLLBACK")
    blocker.close()

    m2 = ShadowMetrics()
    restarted = PairWriter(store, m2, tmp_path / "spill", batch_size=2, flush_interval_s=0.01)
    restarted.start()  # a new process: replays the file the first one left
    await until(lambda: counts(m2)["replayed"] == 10)
    await restarted.close()
    assert store.count() == 10
    assert all(store.get(r.pair_id) == r for r in records(0, 10))


async def test_a_torn_spill_line_is_logged_without_its_text(tmp_path, capsys):
    store, m = SqliteStore(tmp_path / "pairs.db"), ShadowMetrics()
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "pairs.spill.jsonl").write_text('{"pair_id": "x", "request": "mail ann@example.com')
    writer = PairWriter(store, m, spill, batch_size=3, flush_interval_s=0.01)
    writer.start()
    await until(lambda: dropped(m, "spill_corrupt") == 1)
    await writer.close()
    logged = capsys.readouterr()
    assert "shadow.spill.corrupt_line" in logged.out + logged.err
    assert "ann@example.com" not in logged.out + logged.err


async def test_leftover_files_from_a_crash_are_replayed_once(tmp_path):
    store, m = SqliteStore(tmp_path / "pairs.db"), ShadowMetrics()
    store.write_batch(records(0, 2))  # a crash mid-replay: these two were already stored
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "pairs.replaying.jsonl").write_text(
        "".join(r.to_json() + "\n" for r in records(0, 4)))
    (spill / "pairs.spill.jsonl").write_text(
        "".join(r.to_json() + "\n" for r in records(4, 3)) + '{"pair_id": "torn')
    writer = PairWriter(store, m, spill, batch_size=3, flush_interval_s=0.01)
    writer.start()
    await until(lambda: counts(m)["replayed"] == 7)
    await writer.close()
    assert store.count() == 7
    assert dropped(m, "spill_corrupt") == 1
    assert not any(spill.glob("*.jsonl"))


async def test_one_writer_per_spill_name(tmp_path):
    store, m = SqliteStore(tmp_path / "pairs.db"), ShadowMetrics()
    first = PairWriter(store, m, tmp_path / "spill")
    first.start()
    with pytest.raises(RuntimeError, match="its own writer name"):
        PairWriter(store, m, tmp_path / "spill").start()
    other = PairWriter(store, m, tmp_path / "spill", name="replica-2")
    other.start()
    await first.close()
    await other.close()
    shutil.rmtree(tmp_path / "spill")


# --- responses and feedback ------------------------------------------------------------------------


def responses(start: int, n: int):
    from shadow.records import ResponseRecord

    return [ResponseRecord(f"chatcmpl-r{i:04d}", "default", "student-b" if i % 2 else "student-a",
                           "v3", f"2026-11-28T22:00:{i % 60:02d}.000000+00:00")
            for i in range(start, start + n)]


def test_responses_and_feedback_round_trip(tmp_path):
    from shadow.records import FeedbackRecord

    store = SqliteStore(tmp_path / "pairs.db")
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
    got = list(store.iter_feedback())
    assert [(g.feedback_id, g.metric, g.value, g.comment, g.response.response_id,
             g.response.variant) for g in got] == [
        (f.feedback_id, f.metric, f.value, f.comment, f.response.response_id, f.response.variant)
        for f in fb]
    assert [g.feedback_id for g in store.iter_feedback(since=fb[3].created_at)] == ["fb-3", "fb-4"]


def test_iter_pairs_until_is_exclusive(tmp_path):
    store = SqliteStore(tmp_path / "pairs.db")
    batch = records(0, 6)
    store.write_batch(batch)
    got = list(store.iter_pairs(since=batch[1].created_at, until=batch[4].created_at))
    assert got == batch[1:4]


async def test_responses_spill_and_replay_counted_by_kind(tmp_path):
    db = tmp_path / "pairs.db"
    store, m = SqliteStore(db), ShadowMetrics()
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=4, flush_interval_s=0.02)
    writer.start()
    break_store(db)
    for item in [*responses(0, 3), *records(0, 2)]:
        writer.offer(item)
    await until(lambda: counts(m, "response")["spilled"] == 3 and counts(m)["spilled"] == 2)
    fix_store(db)
    await until(lambda: counts(m, "response")["replayed"] == 3)
    await writer.close()
    assert [store.get_response(r.response_id) for r in responses(0, 3)] == responses(0, 3)
    assert store.count() == 2
    assert counts(m)["replayed"] == 2


async def test_the_spill_files_are_owner_only_and_capped(tmp_path):
    db = tmp_path / "pairs.db"
    store, m = SqliteStore(db), ShadowMetrics()
    store.count()
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    line = len((records(0, 1)[0].to_json() + "\n").encode())
    writer = PairWriter(store, m, tmp_path / "spill", batch_size=1, flush_interval_s=0.01,
                        max_spill_bytes=int(line * 2.5))  # room for two records
    writer.start()
    break_store(db)
    for r in records(0, 4):
        writer.offer(r)
    await until(lambda: counts(m)["spilled"] + dropped(m, "spill_full") == 4)
    assert (counts(m)["spilled"], dropped(m, "spill_full")) == (2, 2)
    assert oct(writer.spill_path.stat().st_mode & 0o777) == "0o600"
    await writer.close()
    assert_nothing_lost(m, 4)
