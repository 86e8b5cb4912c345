"""A saturated teacher: samples beyond the budget are dropped and counted, the user unharmed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.gateway import Gateway, wait_until
from shadow.store import SqliteStore
from tests.integration.conftest import scrape, wait_for_metric

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "Explain tides."}]


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget")
    config = {
        "server": {"ingress": {"replicas": 1, "num_cpus": 0}},
        "shadow": {"store_path": str(tmp / "pairs.sqlite"), "spill_dir": str(tmp / "spill"),
                   "semantic_model": None, "max_concurrency": 1, "max_in_flight": 1},
        "variants": {
            "student": {"engine": {"engine": "fake", "completion_tokens": 8}, "num_cpus": 0},
            # Each teacher answer takes 1.5 s: a teacher far slower than the traffic.
            "teacher": {"engine": {"engine": "fake", "completion_tokens": 4, "ttft_s": 1.5},
                        "num_cpus": 0, "nice": 10},
        },
        "routes": {"all": {"variant": "student",
                           "shadow": {"variant": "teacher", "sample_rate": 1}}},
    }
    gw = Gateway(config, tmp)
    gw.store = SqliteStore(tmp / "pairs.sqlite")
    yield gw
    gw.stop()


def test_a_saturated_teacher_lowers_the_effective_rate(budgeted):
    client = budgeted.client()
    ids = [client.chat.completions.create(model="all", messages=MSG).id for _ in range(20)]
    assert len(set(ids)) == 20  # every user request answered
    seen = []

    def mirrored() -> bool:
        seen.append(tuple(scrape(budgeted, "protege_shadow_mirrored_total", outcome=outcome)
                          for outcome in ("sent", "budget")))
        return sum(seen[-1]) == 20

    wait_until(mirrored, "20 mirrors sent or over budget", 30, 0.5,
               lambda: f"(sent, budget) = {seen[-1]}")
    sent, budget = seen[-1]
    # One mirror at a time, each 1.5 s, while 20 requests took far less: most were not sent.
    assert sent >= 1 and budget >= 10, (sent, budget)
    wait_for_metric(budgeted, "protege_shadow_dropped_total", budget, reason="budget")
    wait_for_metric(budgeted, "protege_shadow_records_total", sent, kind="pair", outcome="stored",
                    timeout_s=30)
    assert budgeted.store.count() == sent


def processes_under(root: int) -> dict[int, tuple[str, int]]:
    """pid -> (command line, niceness) of every process descending from `root`, from /proc."""
    parent, seen = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # a process that has just exited
        parent[int(entry.name)] = int(stat[1])
        seen[int(entry.name)] = (cmdline, int(stat[16]))

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parent.get(pid, 1)
        return False

    return {pid: seen[pid] for pid in seen if descends(pid)}


def test_teacher_work_runs_below_the_users_requests(budgeted):
    """The user path (ingress, student) at niceness 0, the teacher at its `nice: 10` and the
    shadow worker at its default 10: under Ray's own default (15) all would be equal."""
    def niceness(name: str) -> set[int]:
        return {nice for cmd, nice in processes_under(budgeted.proc.pid).values()
                if cmd.startswith(f"ray::ServeReplica:protege:{name}")}

    assert niceness("ingress") == {0}
    assert niceness("variant-student") == {0}
    assert niceness("variant-teacher") == {10}
    assert niceness("shadow") == {10}
