"""Pure helpers for the benchmark scripts: percentiles, summaries, ratios and a text table.

No clock, no I/O: numbers in, numbers or strings out (tested in tests/unit/test_bench_stats.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None (the mean of the middle two for an even
    count); None when there are none."""
    xs = sorted(x for x in values if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def summarize(latencies_s: Sequence[float], wall_s: float) -> dict[str, float]:
    """p50/p99/mean latency in ms and requests per second over a wall time of `wall_s`."""
    n = len(latencies_s)
    if n == 0:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan,
                "rps": 0.0}
    return {
        "n": n,
        "p50_ms": percentile(latencies_s, 50) * 1000,
        "p99_ms": percentile(latencies_s, 99) * 1000,
        "mean_ms": sum(latencies_s) / n * 1000,
        "rps": n / wall_s if wall_s > 0 else math.nan,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing, not finite, or b is 0."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def fmt_ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    """'1.23x' for a / b; 'n/a' when the ratio is undefined."""
    r = ratio(a, b)
    return "n/a" if r is None else f"{r:.{digits}f}x"


def fmt_added_ms(a_ms: float | None, b_ms: float | None, digits: int = 1) -> str:
    """'+12.3 ms' for a - b (signed); 'n/a' when either is missing or not finite."""
    if a_ms is None or b_ms is None or not (math.isfinite(a_ms) and math.isfinite(b_ms)):
        return "n/a"
    return f"{a_ms - b_ms:+.{digits}f} ms"


def tokens_per_s(tokens: int, seconds: float) -> float:
    """Tokens over seconds; nan when no time passed."""
    return tokens / seconds if seconds > 0 else math.nan


def fmt_num(x: float | None, digits: int = 1) -> str:
    """A fixed-point number, or 'n/a' for None / nan."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def proc_stat_cpu(text: str) -> tuple[int, int]:
    """(busy, steal) clock ticks of all CPUs from the text of /proc/stat.

    busy = user + nice + system + irq + softirq (guest time is inside user already);
    steal = time the hypervisor gave to other machines.
    """
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:]]
            f += [0] * (8 - len(f))
            user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
            return user + nice + system + irq + softirq, steal
    raise ValueError("no 'cpu ' line in /proc/stat text")


def stream_summary(records: Sequence[dict], wall_s: float) -> dict[str, float | None]:
    """Streamed requests, each `{"start": t, "chunks": [arrival of each content chunk],
    "tokens": completion tokens}` (seconds): the aggregate tokens/s over `wall_s`, and per
    stream the time to the first chunk (TTFT) and the mean time between tokens after the first
    (ITL: (last chunk - first chunk) / (tokens - 1)), p50 and p99 in ms."""
    tokens = sum(r["tokens"] for r in records)
    ttft = [(r["chunks"][0] - r["start"]) * 1000 for r in records if r["chunks"]]
    itl = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) * 1000 for r in records
           if r["chunks"] and r["tokens"] >= 2]

    def p(xs: list[float], q: float) -> float | None:
        return percentile(xs, q) if xs else None

    return {"requests": len(records), "tokens": tokens, "wall_s": wall_s,
            "tok_s": tokens_per_s(tokens, wall_s), "ttft_p50_ms": p(ttft, 50),
            "ttft_p99_ms": p(ttft, 99), "itl_p50_ms": p(itl, 50), "itl_p99_ms": p(itl, 99)}
