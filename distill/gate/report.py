"""The gate's report: `GateReport`, `gate.json` and the one self-contained page `gate.html`
(plots inline as PNG, every text escaped), and the terminal summary."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.gate.checks import fmt


@dataclass
class GateReport:
    passed: bool
    failures: list[str]  # stated reasons, e.g. "fidelity.rouge_l 0.210 < 0.300"
    checks: dict[str, Any]  # name -> {"status": passed|failed|skipped|disabled|error, ...}
    meta: dict[str, Any] = field(default_factory=dict)  # models, config, machine, timings

    def to_json(self) -> dict:
        return plain({"passed": self.passed, "failures": self.failures, "checks": self.checks,
                       "meta": self.meta})


def plain(x: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN to None, paths to strings."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x




CLIP = 600  # characters of a prompt or answer shown in gate.html (gate.json keeps them whole)
_CSS = ("body{font:14px system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;"
        "padding:4px 8px;vertical-align:top;text-align:left}td.t{white-space:pre-wrap;"
        "max-width:380px;font-family:monospace;font-size:12px}.passed{color:#176f2c}"
        ".failed,.error{color:#b00020}.skipped,.disabled{color:#777}img{max-width:100%}")


def _e(x: Any) -> str:
    text = x if isinstance(x, str) else fmt(x) if isinstance(x, float) else str(x)
    return html.escape(text if len(text) <= CLIP else text[:CLIP] + "…")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], text_cols: set[int] = frozenset()
           ) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td{' class=t' if i in text_cols else ''}>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _reliability_plot(rows: list[dict[str, Any]]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    ax, hist = fig.subplots(1, 2)
    used = [r for r in rows if r["n"]]
    ax.plot([0, 1], [0, 1], "--", color="#999", label="perfect calibration")
    ax.bar([(r["lo"] + r["hi"]) / 2 for r in used], [r["accuracy"] for r in used],
           width=rows[0]["hi"] - rows[0]["lo"], edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([r["confidence"] for r in used], [r["accuracy"] for r in used], "o-", color="C3",
            label="bins at their mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max next-token probability)",
           ylabel="top-1 = teacher token", title="Reliability diagram")
    ax.legend(fontsize=8)
    hist.bar([(r["lo"] + r["hi"]) / 2 for r in rows], [r["n"] for r in rows],
             width=rows[0]["hi"] - rows[0]["lo"], edgecolor="k")
    hist.set(xlim=(0, 1), xlabel="confidence", ylabel="tokens", title="Tokens per bin")
    return _png(fig)


def _latency_plot(cells: list[dict[str, Any]]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    ttft, tps = fig.subplots(1, 2)
    for batch in sorted({c["batch"] for c in cells}):
        mine = [c for c in cells if c["batch"] == batch]
        xs = [c["concurrency"] for c in mine]
        ttft.plot(xs, [c["ttft_ms"]["p95"] for c in mine], "o-", label=f"batch {batch}")
        tps.plot(xs, [c["tokens_per_s"] for c in mine], "o-", label=f"batch {batch}")
    ttft.set(xlabel="concurrency (clients)", ylabel="ms", title="p95 time to first token")
    tps.set(xlabel="concurrency (clients)", ylabel="tokens/s", title="Throughput")
    for ax in (ttft, tps):
        ax.legend(fontsize=8)
        ax.set_xticks(sorted({c["concurrency"] for c in cells}))
    return _png(fig)


def _section(name: str, check: dict[str, Any]) -> str:
    status = _e(check["status"])
    parts = [f"<h2>{_e(name)} <span class={status}>{status}</span></h2>",
             f"<p>{_e(check.get('summary', ''))}</p>"]
    parts += [f"<p><i>{_e(n)}</i></p>" for n in check.get("notes", ())]
    if name == "champion" and check.get("rows"):
        parts.append(_table(
            ["metric", "n", "champion", "challenger", "difference [interval]", "margin",
             "McNemar p", "decision", "gate"],
            [[r["metric"] + (" (primary)" if r["primary"] else ""), r["n"], r["champion"],
              r["challenger"], f"{r['difference']:+.3f} [{fmt(r['low'])}, {fmt(r['high'])}]",
              r["margin"], r["mcnemar"]["p_value"] if r["mcnemar"] else "",
              r["decision"], "pass" if r["passed"] else "FAIL"] for r in check["rows"]]))
        parts.append(f"<p>Paired on the same cases; {fmt(check['confidence'] * 100)}% paired "
                     "bootstrap intervals of challenger minus champion. A metric fails when the "
                     "interval's worse end passes its margin; the primary metric must also be "
                     "significantly better (interval above 0, and McNemar's exact test for "
                     "pass/fail outcomes).</p>")
    if name == "tasks" and "pass_rate" in check:
        sides = list(check["pass_rate"])
        families = list(check["pass_rate"][sides[0]]["families"])

        def cell(r: dict[str, Any]) -> str:
            return f"{fmt(r['rate'])} [{fmt(r['low'])}, {fmt(r['high'])}] ({r['passed']}/{r['n']})"

        parts.append(_table(["family", *sides],
                            [[f, *(cell(check["pass_rate"][s]["families"][f]) for s in sides)]
                             for f in families]
                            + [["overall", *(cell(check["pass_rate"][s]["overall"])
                                             for s in sides)]]))
        changed = [r for r in check["rows"] if "champion" in r
                   and r["champion"]["passed"] != r["student"]["passed"]]
        if changed:
            parts.append("<h3>Cases where champion and challenger differ</h3>" + _table(
                ["id", "prompt", "champion", "challenger"],
                [[r["id"], r["prompt"],
                  ("pass: " if r["champion"]["passed"] else "FAIL: ") + r["champion"]["answer"],
                  ("pass: " if r["student"]["passed"] else "FAIL: ") + r["student"]["answer"]]
                 for r in changed], text_cols={1, 2, 3}))
    if name == "edge_cases" and "rows" in check:
        sides = [s for s in ("student", "champion", "teacher") if s in check["rows"][0]]
        parts.append(_table(["id", "kind", "prompt", *[f"{s} answer" for s in sides],
                             *[f"{s}" for s in sides]],
                            [[r["id"], r["kind"], r["prompt"], *[r[s]["answer"] for s in sides],
                              *["pass" if r[s]["passed"] else f"FAIL: {r[s]['why']}"
                                for s in sides]] for r in check["rows"]],
                            text_cols=set(range(2, 3 + len(sides)))))
    if name == "fidelity" and "rows" in check:
        worst = sorted(check["rows"], key=lambda r: r["rouge_l"])[:10]
        parts.append("<h3>Lowest ROUGE-L pairs</h3>" + _table(
            ["id", "rouge_l", "prompt", "student", "teacher"],
            [[r["id"], r["rouge_l"], r["prompt"], r["student"], r["teacher"]] for r in worst],
            text_cols={2, 3, 4}))
    if name == "calibration":
        if check.get("reliability"):
            parts.append(_reliability_plot(check["reliability"]))
            parts.append(_table(["bin", "tokens", "mean confidence", "accuracy"],
                                [[f"{r['lo']:.1f}-{r['hi']:.1f}", r["n"], r["confidence"],
                                  r["accuracy"]] for r in check["reliability"]]))
        if check.get("labels"):
            parts.append("<h3>Label probabilities</h3>" + _table(
                ["id", "expected", "predicted", "P(expected)"],
                [[r["id"], r["expected"], r["predicted"], r["probs"][r["expected"]]]
                 for r in check["labels"]]))
    if name == "latency" and check.get("cells"):
        parts.append(_latency_plot(check["cells"]))
        parts.append(_table(
            ["batch", "concurrency", "requests", "TTFT p50/p95/p99 ms", "ITL p50/p95/p99 ms",
             "tokens/s"],
            [[c["batch"], c["concurrency"], c["requests"],
              " / ".join(fmt(c["ttft_ms"][p]) for p in ("p50", "p95", "p99")),
              " / ".join(fmt(c["inter_token_ms"][p]) for p in ("p50", "p95", "p99")),
              c["tokens_per_s"]] for c in check["cells"]]))
        parts.append(_table(["memory", "MB"], list(check["memory"].items())))
    if name == "ab" and check.get("metrics"):
        rows = [[metric, arm, s["n"], s["mean"], s["low"], s["high"], s["interval"]]
                for metric, m in check["metrics"].items()
                for arm in ("candidate", "control") if (s := m[arm])]
        parts.append(_table(["metric", "arm", "n", "mean", "95% low", "95% high", "interval"],
                            rows))
    return "\n".join(parts)


def render_html(data: dict[str, Any]) -> str:
    """gate.html from `GateReport.to_json()`: one page, plots inline, every text escaped."""
    meta = data.get("meta", {})
    machine = meta.get("machine", {})
    verdict = "PASSED" if data["passed"] else "FAILED"
    head = (f"<h1>Validation gate: <span class={'passed' if data['passed'] else 'failed'}>"
            f"{verdict}</span></h1><p>student <code>{_e(meta.get('student'))}</code>, teacher "
            f"<code>{_e(meta.get('teacher'))}</code>, {_e(meta.get('started_at', ''))}, "
            f"{_e(meta.get('duration_s', ''))} s on {_e(machine.get('cpu'))} "
            f"({_e(machine.get('cores'))} cores, GPU: {_e(machine.get('gpu') or 'none')})</p>")
    failures = ("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in data["failures"]) + "</ul>"
                if data["failures"] else "<p>Every threshold holds.</p>")
    overview = _table(["check", "status", "summary"],
                      [[k, v["status"], v.get("summary", "")] for k, v in data["checks"].items()])
    body = "\n".join(_section(k, v) for k, v in data["checks"].items()
                     if v["status"] not in ("disabled",))
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>gate: {verdict}</title>"
            f"<style>{_CSS}</style></head><body>{head}{failures}{overview}{body}"
            f"<details><summary>config</summary><pre>"
            f"{html.escape(json.dumps(meta.get('config', {}), indent=2))}</pre></details>"
            "</body></html>\n")


def write_report(report: GateReport, out_dir: str | Path) -> tuple[Path, Path]:
    """`out_dir`/gate.json and `out_dir`/gate.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    (out / "gate.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (out / "gate.html").write_text(render_html(data), encoding="utf-8")
    return out / "gate.json", out / "gate.html"


def summary_rows(report: GateReport) -> list[tuple[str, str, str]]:
    """(check, status, summary) per check, for the terminal."""
    return [(k, v["status"], v.get("summary", "")) for k, v in report.checks.items()]
