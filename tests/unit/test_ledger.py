"""The mirror ledger: lines survive the writer, torn lines are skipped, reconcile accounts for
every sampled pair."""

from __future__ import annotations

import os
import subprocess
import sys

from shadow.ledger import Ledger, earlier_runs, read_ledgers, reconcile


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
    sampled, dropped = read_ledgers(earlier_runs(tmp_path, "run2"))
    assert sampled == [f"id{i}" for i in range(100)] and dropped == [("id3", "budget")]


def test_earlier_runs_skips_the_current_one_and_torn_lines(tmp_path):
    old, now = Ledger(tmp_path, "r1", "ingress-1"), Ledger(tmp_path, "r2", "ingress-1")
    old.sampled("a")
    old.dropped("a", "teacher_failed")
    now.sampled("b")
    old.close()
    now.close()
    with open(old.path, "a") as f:
        f.write("torn\tsamp")  # a crash mid-line: no newline
    assert earlier_runs(tmp_path, "r2") == [old.path]
    assert read_ledgers([old.path]) == (["a"], [("a", "teacher_failed")])
    assert earlier_runs(tmp_path / "absent", "r2") == []
    old.sampled("after close is a no-op")


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
