"""`protege shadow report`: where the student disagrees with its teacher, and what users said.

`summarize` is pure: pairs and feedback in (any iterables, read once), one JSON-ready dict out.
`render` turns that dict into the terminal tables. Reading the store belongs to the CLI.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from shadow.records import FeedbackRecord, PairRecord

CLIP = 160  # characters of a prompt or answer shown in the worst-pairs table
# Scores of pairs whose request had a response_format (`shadow.scoring.format_scores`).
STRUCTURED = ("student_format_valid", "teacher_format_valid", "field_agreement",
              "field_agreement_normalized", "tool_name_agreement", "tool_args_agreement")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"mean": _mean(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def prompt_text(pair: PairRecord) -> str:
    """The last user message (or the prompt) of a pair; "" when the route stores no prompt."""
    messages = pair.request.get("messages") or []
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return users[-1] if users else pair.request.get("prompt") or ""


def summarize(pairs: Iterable[PairRecord], feedback: Iterable[FeedbackRecord], *,
              worst: int = 5) -> dict[str, Any]:
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    heap: list[tuple[float, str, dict]] = []  # the `worst` highest disagreements
    total = scored = 0
    for p in pairs:
        total += 1
        g = groups[(p.route, p.student.version or "-")]
        g["student_ms"].append(p.student.latency_ms)
        g["teacher_ms"].append(p.teacher.latency_ms)
        for side, answer in (("student", p.student), ("teacher", p.teacher)):
            if answer.ttft_ms is not None:
                g[f"{side}_ttft_ms"].append(answer.ttft_ms)
        if p.disagreement is None:
            continue
        for key in STRUCTURED:  # pairs of requests with a response_format
            if p.scores.get(key) is not None:
                g[key].append(p.scores[key])
        scored += 1
        g["disagreement"].append(p.disagreement)
        row = {"pair_id": p.pair_id, "route": p.route, "disagreement": p.disagreement,
               "prompt": prompt_text(p)[:CLIP], "student": p.student.text[:CLIP],
               "teacher": p.teacher.text[:CLIP]}
        item = (p.disagreement, p.pair_id, row)
        if len(heap) < worst:
            heapq.heappush(heap, item)
        elif worst and item > heap[0]:
            heapq.heapreplace(heap, item)
    routes = []
    for (route, version), g in sorted(groups.items()):
        routes.append({
            "route": route, "student_version": version, "pairs": len(g["student_ms"]),
            "scored": len(g["disagreement"]), "disagreement": _stats(g["disagreement"]),
            "student_latency_ms": _stats(g["student_ms"]),
            "teacher_latency_ms": _stats(g["teacher_ms"]),
            "student_ttft_ms": _stats(g["student_ttft_ms"]),
            "teacher_ttft_ms": _stats(g["teacher_ttft_ms"]),
            "structured": {"pairs": len(g["student_format_valid"]),
                           **{k: _mean(g[k]) for k in STRUCTURED}},
        })
    fb: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for f in feedback:
        r = f.response
        agg = fb.setdefault((r.route, r.variant, r.version, f.metric),
                            {"count": 0, "values": 0, "sum": 0.0, "comments": 0})
        agg["count"] += 1
        if f.value is None:
            agg["comments"] += 1
        else:
            agg["values"] += 1
            agg["sum"] += f.value
    feedback_rows = [
        {"route": route, "variant": variant, "version": version, "metric": metric,
         "count": a["count"], "comments": a["comments"],
         "mean": a["sum"] / a["values"] if a["values"] else None}
        for (route, variant, version, metric), a in sorted(fb.items())
    ]
    return {"pairs": total, "scored": scored, "routes": routes,
            "worst": [row for _, _, row in sorted(heap, reverse=True)],
            "feedback": feedback_rows}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(summary: dict[str, Any]):
    """The report as rich renderables, to print with a rich Console."""
    from rich.table import Table

    out = []
    t = Table(title=f"Shadow pairs: {summary['pairs']} ({summary['scored']} scored); "
                    "disagreement 0 (agree) to 1")
    for col in ("route", "student version", "pairs", "mean", "p50", "p90", "p99"):
        t.add_column(col, justify="left" if col in ("route", "student version") else "right")
    lat = Table(title="Latency p50 (ms): request to last token, and to the first")
    for col in ("route", "student version", "student", "teacher", "student TTFT",
                "teacher TTFT"):
        lat.add_column(col, justify="left" if col in ("route", "student version") else "right")
    for r in summary["routes"]:
        d = r["disagreement"]
        t.add_row(r["route"], r["student_version"], str(r["pairs"]), _fmt(d["mean"]),
                  _fmt(d["p50"]), _fmt(d["p90"]), _fmt(d["p99"]))
        lat.add_row(r["route"], r["student_version"], _fmt(r["student_latency_ms"]["p50"], 1),
                    _fmt(r["teacher_latency_ms"]["p50"], 1), _fmt(r["student_ttft_ms"]["p50"], 1),
                    _fmt(r["teacher_ttft_ms"]["p50"], 1))
    out += [t, lat]
    structured = [r for r in summary["routes"] if r["structured"]["pairs"]]
    if structured:
        st = Table(title="Structured outputs (requests with a response_format or tools): share "
                         "of answers that conform, of JSON keys whose values agree, and of "
                         "tool calls both answers make")
        for col in ("route", "student version", "pairs", "student valid", "teacher valid",
                    "fields equal", "fields equal (normalised)", "same tools",
                    "same calls (arguments too)"):
            st.add_column(col, justify="left" if col in ("route", "student version") else "right")
        for r in structured:
            x = r["structured"]
            st.add_row(r["route"], r["student_version"], str(x["pairs"]),
                       *(_fmt(x[k]) for k in STRUCTURED))
        out.append(st)
    if summary["worst"]:
        w = Table(title="Worst pairs (highest disagreement)", show_lines=True)
        for col in ("disagreement", "route / pair", "prompt", "student", "teacher"):
            w.add_column(col, overflow="fold")
        for row in summary["worst"]:
            w.add_row(_fmt(row["disagreement"]), f"{row['route']}\n{row['pair_id']}",
                      row["prompt"], row["student"], row["teacher"])
        out.append(w)
    if summary["feedback"]:
        f = Table(title="Feedback by arm")
        for col in ("route", "variant", "version", "metric", "count", "mean", "comments"):
            f.add_column(col, justify="right" if col in ("count", "mean", "comments") else "left")
        for row in summary["feedback"]:
            f.add_row(row["route"], row["variant"], row["version"], row["metric"],
                      str(row["count"]), _fmt(row["mean"]), str(row["comments"]))
        out.append(f)
    return out
