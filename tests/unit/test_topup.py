"""Soft targets from a prompt pool (distill.topup): only answers that pass their check are
kept, cut answers are dropped, and answers are cached so a second run asks nobody."""

import json

import pytest

from distill.answers import answer_all
from distill.tasks import TaskCase
from distill.topup import prompt_key, read_cache, teacher_examples


def case(i: int, pattern: str, max_tokens: int = 64) -> TaskCase:
    return TaskCase(id=f"c{i}", suite="t/1", split="train", family="f" if i % 3 else "g",
                    messages=[{"role": "user", "content": f"question number {i}"}],
                    check={"kind": "regex", "pattern": pattern}, reference="x",
                    max_tokens=max_tokens)


def test_keeps_passing_answers_drops_failing_and_cut_ones(tmp_path):
    pool = [case(i, "." if i % 2 == 0 else "zebra") for i in range(10)]
    pool.append(case(10, ".", max_tokens=2))  # the fake engine's 16 tokens are cut at 2
    got = teacher_examples("fake", pool, 100, cache=tmp_path / "cache.jsonl")
    assert (got["kept"], got["asked"], got["failed_check"], got["cut"]) == (5, 11, 5, 1)
    assert sorted(e["id"] for e in got["examples"]) == [f"pool-c{i}" for i in (0, 2, 4, 6, 8)]
    first = got["examples"][0]
    source = next(c for c in pool if f"pool-{c.id}" == first["id"])
    expected = answer_all("fake", [source.messages], max_tokens=64)[0].text
    assert first["messages"] == [*source.messages, {"role": "assistant", "content": expected}]
    assert first["source"] == "pool" and first["split"] == "train"


def test_stops_at_want_skips_excluded_and_reuses_the_cache(tmp_path):
    pool = [case(i, ".") for i in range(20)]
    cache = tmp_path / "cache.jsonl"
    got = teacher_examples("fake", pool, 4, cache=cache,
                           exclude={"question number 3", "question number 7"})
    assert got["kept"] == got["asked"] == 4
    assert not {"pool-c3", "pool-c7"} & {e["id"] for e in got["examples"]}
    rows = read_cache(cache)
    assert len(rows) == 4 and all(k == prompt_key("fake", c) for c in pool
                                  for k in rows if rows[k]["id"] == c.id)
    # The same pool under another teacher name, its answers already cached: no engine at all
    # (this "teacher" does not exist, so asking it would fail).
    ghost = str(tmp_path / "absent.gguf")
    with open(cache, "a") as f:
        for c in pool:
            f.write(json.dumps({"key": prompt_key(ghost, c), "id": c.id, "answer": "cached",
                                "finish_reason": "stop"}) + "\n")
        f.write('{"key": "torn')  # a torn last line (a killed writer) is ignored
    again = teacher_examples(ghost, pool, 20, cache=cache)
    assert again["kept"] == 20 and {e["messages"][-1]["content"]
                                    for e in again["examples"]} == {"cached"}
    with pytest.raises(ValueError, match="no such file"):
        teacher_examples(ghost, [case(99, ".")], 1, cache=cache)
