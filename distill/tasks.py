"""The task suite: enterprise task cases with automatic checks, and how a model scores on them.

A suite file (JSONL, written by `examples/tasks/generate.py`) holds one `TaskCase` per line: a
family (classify, extract, qa, format, summarize, structured), a split (`dev` for tuning, `gate` for the
gate, `train` for a prompt pool), chat messages (and, for structured cases, the request's
`response_format` or `tools`, which constrain the answer as a client's would), a check (`distill.gate.checks.Expect`) and a
reference answer that passes it. `score` turns answers into per-case outcomes; `summary` gives
the pass rate overall and per family with Wilson intervals. Pure: `distill.evaluate` runs the
models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.gate.checks import Expect, check_answer, wilson_interval
from serving.engines import ResponseFormat, ToolUse, parse_response_format, parse_tools

SPLITS = ("dev", "gate", "train")


class TaskCase(BaseModel):
    """One case of the suite."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    suite: str = Field(min_length=1, description="suite name and version, e.g. protege-tasks/1")
    split: Literal[SPLITS]
    family: str = Field(min_length=1)
    kind: str = Field("", description="the template within the family")
    messages: list[dict[str, str]] = Field(min_length=1)
    check: Expect
    reference: str = Field(description="an answer that passes the check")
    max_tokens: int = Field(64, ge=1, le=4096)
    response_format: dict[str, Any] | None = Field(
        None, description="the request's response_format, as a client sends it (structured)")
    tools: list[dict[str, Any]] | None = Field(None, description="the request's tools")
    tool_choice: str | dict[str, Any] | None = Field(None, description="the request's tool_choice")

    @model_validator(mode="after")
    def _conditions_parse(self) -> TaskCase:
        self.conditions()  # a response_format or tools the engines could not honour: refused
        return self

    def conditions(self) -> tuple[ResponseFormat | None, ToolUse | None]:
        """What constrains the answer besides the messages, parsed as the gateway parses it."""
        try:
            fmt = parse_response_format(self.response_format)
            tools = parse_tools(self.tools, self.tool_choice) if self.tools else None
        except ValueError as e:
            raise ValueError(f"case {self.id}: {e}") from None
        return fmt, tools


def load_suite(path: str | Path, *, splits: Sequence[str] | None = None,
               families: Sequence[str] | None = None, limit: int | None = None
               ) -> list[TaskCase]:
    """The cases of `path` in file order, only those of `splits` and `families` when given;
    `limit` keeps that many evenly spread per family. ValueError names the line at fault."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"task suite {path}: {e.strerror or e}") from None
    cases, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            case = TaskCase.model_validate(json.loads(line))
        except (ValueError, ValidationError) as e:
            raise ValueError(f"task suite {path}, line {number}: {e}") from None
        if case.id in seen:
            raise ValueError(f"task suite {path}, line {number}: id {case.id!r} repeats")
        seen.add(case.id)
        cases.append(case)
    for name, wanted, have in (("split", splits, {c.split for c in cases}),
                               ("family", families, {c.family for c in cases})):
        unknown = sorted(set(wanted or ()) - have)
        if unknown:
            raise ValueError(f"task suite {path}: no case of {name} {', '.join(unknown)} "
                             f"(it has {', '.join(sorted(have))})")
    cases = [c for c in cases if (splits is None or c.split in splits)
             and (families is None or c.family in families)]
    if limit is not None:
        cases = [c for fam in dict.fromkeys(c.family for c in cases)
                 for c in spread([c for c in cases if c.family == fam], limit)]
    if not cases:
        raise ValueError(f"task suite {path}: no cases selected")
    return cases


def spread(rows: list[Any], n: int) -> list[Any]:
    """`n` rows evenly spaced through `rows` (all of them when there are not more)."""
    return rows if len(rows) <= n else [rows[i * len(rows) // n] for i in range(n)]


def score(cases: Sequence[TaskCase], answers: Sequence[str]) -> list[dict[str, Any]]:
    """One row per case: id, family, kind, passed and why not."""
    if len(cases) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(cases)} cases")
    rows = []
    for case, answer in zip(cases, answers):
        passed, why = check_answer(answer, case.check)
        rows.append({"id": case.id, "family": case.family, "kind": case.kind,
                     "passed": passed, "why": why, "answer": answer})
    return rows


def summary(rows: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Pass rate with its Wilson interval, overall and per family (in order of appearance)."""

    def rate(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n, k = len(group), sum(bool(r["passed"]) for r in group)
        low, high = wilson_interval(k, n, confidence)
        return {"n": n, "passed": k, "rate": k / n if n else None, "low": low, "high": high}

    families = dict.fromkeys(r["family"] for r in rows)
    return {"overall": rate(rows), "confidence": confidence,
            "families": {f: rate([r for r in rows if r["family"] == f]) for f in families}}


def summary_table(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows of a text table, one per family and overall, one column per model:
    `rate [low, high]`. `results` maps a model's name to its `summary`."""
    names = list(results)
    families = list(dict.fromkeys(f for s in results.values() for f in s["families"]))

    def cell(r: dict[str, Any] | None) -> str:
        if not r or r["n"] == 0:
            return "-"
        return f"{r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] ({r['passed']}/{r['n']})"

    rows = [["family", *names]]
    rows += [[f, *(cell(results[n]["families"].get(f)) for n in names)] for f in families]
    rows.append(["overall", *(cell(results[n]["overall"]) for n in names)])
    return rows
