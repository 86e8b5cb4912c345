"""A word-by-word diff of two answers for the review page, bounded in size and time (pure).

Myers' O((N+M)D) shortest edit script over word, space and punctuation tokens, with D capped;
past the caps the answers are shown as two whole blocks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

_TOKEN = re.compile(r"\w+|\s+|[^\w\s]")
MAX_DIFF_TOKENS = 20_000  # longer answers are shown as two whole blocks
MAX_DIFF_EDITS = 2_000  # a diff needing more token edits is shown as two whole blocks
DIFF_BUDGET_S = 0.5  # and so is one that takes longer than this to find


def word_diff(student: str, teacher: str, budget_s: float = DIFF_BUDGET_S
              ) -> list[list[str]]:
    """`[[kind, text], ...]` in order, kind `same`, `student` or `teacher`: the `same` and
    `student` texts joined are `student`, the `same` and `teacher` texts joined are `teacher`.
    Whitespace alone between two changes counts as changed, so a changed phrase reads whole.
    Bounded: past `MAX_DIFF_TOKENS`, `MAX_DIFF_EDITS` or `budget_s`, the answers differ as two
    whole blocks (Myers' O((N+M)D) diff, with D capped, after the common prefix and suffix)."""
    a, b = _TOKEN.findall(student), _TOKEN.findall(teacher)
    ops = None
    if len(a) + len(b) <= MAX_DIFF_TOKENS:
        ops = _myers(a, b, MAX_DIFF_EDITS, time.monotonic() + budget_s)
    if ops is None:
        ops = [("replace", 0, len(a), 0, len(b))]
    out: list[list[str]] = []
    student_run, teacher_run = [], []  # the change being collected

    def flush() -> None:
        for kind, run in (("student", student_run), ("teacher", teacher_run)):
            if run:
                out.append([kind, "".join(run)])
                run.clear()

    for n, (tag, i1, i2, j1, j2) in enumerate(ops):
        blank_between = 0 < n < len(ops) - 1 and "".join(a[i1:i2]).isspace()
        if tag == "equal" and not blank_between:
            flush()
            out.append(["same", "".join(a[i1:i2])])
        else:
            student_run += a[i1:i2]
            teacher_run += b[j1:j2]
    flush()
    return out


def _myers(a: Sequence[str], b: Sequence[str], max_d: int, deadline: float
           ) -> list[tuple[str, int, int, int, int]] | None:
    """Opcodes (`equal` and `replace` runs, as difflib's) of a shortest edit script from `a`
    to `b`; None when it needs more than `max_d` edits or `deadline` (monotonic) passes."""
    n, m = len(a), len(b)
    v, trace = {1: 0}, []
    for d in range(max_d + 1):
        if d % 16 == 0 and time.monotonic() > deadline:
            return None
        trace.append(v.copy())
        for k in range(-d, d + 1, 2):
            x = v[k + 1] if k == -d or (k != d and v[k - 1] < v[k + 1]) else v[k - 1] + 1
            y = x - k
            while x < n and y < m and a[x] == b[y]:
                x, y = x + 1, y + 1
            v[k] = x
            if x >= n and y >= m:
                return _opcodes(trace, n, m, d)
    return None


def _opcodes(trace: list[dict[int, int]], n: int, m: int, d: int
             ) -> list[tuple[str, int, int, int, int]]:
    """Walk Myers' trace (`trace[e]`: the furthest x per diagonal before round e) back from
    (n, m): the diagonal runs are `equal`, what lies between two of them one `replace`."""
    equal: list[tuple[int, int, int]] = []  # (i, j, length), last first
    x, y = n, m
    for e in range(d, -1, -1):
        v, k = trace[e], x - y
        prev_k = k + 1 if k == -e or (k != e and v[k - 1] < v[k + 1]) else k - 1
        prev_x = v[prev_k]
        prev_y = prev_x - prev_k
        run = min(x - max(prev_x, 0), y - max(prev_y, 0))  # the snake after that round's edit
        if run > 0:
            equal.append((x - run, y - run, run))
        x, y = prev_x, prev_y
    ops: list[tuple[str, int, int, int, int]] = []
    i = j = 0
    for ei, ej, length in reversed(equal):
        if ei > i or ej > j:
            ops.append(("replace", i, ei, j, ej))
        ops.append(("equal", ei, ei + length, ej, ej + length))
        i, j = ei + length, ej + length
    if i < n or j < m:
        ops.append(("replace", i, n, j, m))
    return ops
