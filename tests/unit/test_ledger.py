"""The mirror ledger: lines survive the writer, torn lines are skipped, reconcile accounts for
every sampled pair."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from shadow.ledger import Ledger, current_run, finished, read_ledgers, reconcile


def test_lines_written_before_a_kill_9_are_there(tmp_path):
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[2])\n"
        "from shadow.ledger import Ledger\n"
        "ledger = Ledger(sys.argv[1], 'run1', 'p')\n"
        "for i in range(100): ledger.sampled(f'id{i}')\n"
        "ledger.dropped('id3', 'budget')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), os.getcwd()], check=False)
    assert proc.returncode == -9
    sampled, dropped = read_ledgers(finished(tmp_path, "run2", now=time.time(), min_age_s=0))
    assert sampled == [f"id{i}" for i in range(100)] and dropped == [("id3", "budget")]


def test_earlier_runs_are_finished_and_torn_lines_skipped(tmp_path):
    old, now = Ledger(tmp_path, "r1", "ingress-1"), Ledger(tmp_path, "r2", "ingress-1")
    old.sampled("a")
    old.dropped("a", "teacher_failed")
    now.sampled("b")
    old.close()
    now.close()
    with open(old.path, "a") as f:
        f.write("torn\tsamp")  # a crash mid-line: no newline
    assert finished(tmp_path, "r2", now=time.time(), min_age_s=0) == [old.path]
    assert current_run(tmp_path, "r2") == [now.path]
    assert read_ledgers([old.path]) == (["a"], [("a", "teacher_failed")])
    assert finished(tmp_path / "absent", "r2", now=0, min_age_s=0) == []
    old.sampled("after close is a no-op")


def test_files_rotate_and_closed_ones_of_this_run_finish_when_old(tmp_path):
    ledger = Ledger(tmp_path, "r1", "worker-7", max_lines=3)
    for i in range(7):
        ledger.sampled(f"p{i}")
    files = current_run(tmp_path, "r1")
    assert [f.name for f in files] == [f"r1.worker-7.{n:06d}.ledger" for n in range(3)]
    assert [len(f.read_text().splitlines()) for f in files] == [3, 3, 1]
    later = time.time() + 3600
    # The open file (the last seq) is never finished; closed ones once old enough.
    assert finished(tmp_path, "r1", now=time.time(), min_age_s=60) == []
    assert finished(tmp_path, "r1", now=later, min_age_s=60) == files[:2]
    assert read_ledgers(files)[0] == [f"p{i}" for i in range(7)]
    ledger.close()


def test_reconcile_accounts_for_every_sampled_pair():
    sampled = ["s1", "s2", "d1", "d2", "c1", "s1"]  # s1 noted twice: counted once
    dropped = [("d1", "budget"), ("d2", "teacher_timeout"), ("d2", "queue_full")]
    asked = []

    def stored(ids):
        asked.append(ids)
        return {"s1", "s2", "x-not-sampled"}

    r = reconcile(sampled, dropped, stored)
    assert asked == [["s1", "s2", "d1", "d2", "c1"]]
    assert r.sampled == 5 and r.stored == 2
    assert r.dropped == {"budget": 1, "teacher_timeout": 1, "crash": 1}  # first reason wins
    assert r.crashed == ("c1",) and r.balanced
    assert reconcile([], [], stored).sampled == 0 and len(asked) == 1  # no query for nothing


def test_a_failing_disk_loses_lines_but_never_raises(tmp_path, monkeypatch):
    import errno
    import os

    errors = []
    ledger = Ledger(tmp_path, "r1", "ingress-1", on_error=errors.append)
    ledger.sampled("a")
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    ledger.sampled("lost")
    ledger.dropped("lost", "budget")
    monkeypatch.setattr(os, "write", real_write)
    ledger.sampled("b")  # the disk has room again
    ledger.close()
    assert [e.errno for e in errors] == [errno.ENOSPC, errno.ENOSPC]
    assert read_ledgers([ledger.path]) == (["a", "b"], [])
    assert oct(ledger.path.stat().st_mode & 0o777) == "0o600"
