"""distill.loop.due: when the loop runs (pure)."""

from datetime import UTC, datetime, timedelta

from distill.loop import due

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)


def reasons(**kw):
    args = {"now": NOW, "last_run_at": NOW - timedelta(hours=1), "new_pairs": 0,
            "total_pairs": 100, "teachers_new": set(), "teachers_last": {"qwen:1"},
            "new_pairs_at": 50, "teacher_change": True, "every_hours": None, "min_pairs": 20}
    return due(**{**args, **kw})


def test_nothing_new_is_not_due():
    assert reasons() == []


def test_each_trigger():
    assert reasons(last_run_at=None) == ["first run"]
    assert reasons(new_pairs=50) == ["50 new pairs (>= 50)"]
    assert reasons(new_pairs=49) == []
    assert reasons(new_pairs=60, new_pairs_at=None) == []
    assert reasons(teachers_new={"qwen:2"}) == ["teacher changed to qwen:2"]
    assert reasons(teachers_new={"qwen:1"}) == []
    assert reasons(teachers_new={"qwen:2"}, teacher_change=False) == []
    assert reasons(every_hours=1.0) == ["schedule (every 1 h)"]
    assert reasons(every_hours=2.0) == []


def test_never_below_min_pairs_and_reasons_add_up():
    assert reasons(last_run_at=None, total_pairs=19) == []
    assert reasons(new_pairs=80, teachers_new={"gpt:x"}, every_hours=0.5) == [
        "80 new pairs (>= 50)", "teacher changed to gpt:x", "schedule (every 0.5 h)"]
