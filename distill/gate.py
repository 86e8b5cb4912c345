"""The validation gate: may this student replace its teacher (or the serving student)?

    report = validate("models/student/x.gguf", "models/teacher/y.gguf", load_gate_config(path),
                      out_dir=Path("data/gate"))
    report.passed, report.failures   # e.g. ["fidelity.rouge_l 0.210 < 0.300"]

Owns the gate's YAML (`GateConfig`, `load_gate_config`), running its checks on the real
engines (`distill.answers`) and on the student's own token probabilities (llama.cpp for a GGUF,
transformers for a model folder), reading A/B feedback from the shadow store, and writing
`gate.json` and a self-contained `gate.html`. The numbers themselves (matchers, ECE, intervals)
are pure functions in `distill.gate_checks`; text fidelity is `distill.fidelity.text_fidelity`.

Checks (each `enabled` or not in the YAML; a check that cannot apply is *skipped*, not failed):
- `edge_cases`: a JSONL suite answered greedily by student and teacher; pass rates.
- `fidelity`: the student's greedy answers vs the teacher's on held-out pairs.
- `calibration`: teacher-forced token confidence of the student on the teacher's answers: ECE,
  a reliability diagram, over-confident wrong tokens; label probabilities on label cases.
- `latency`: a batch-size × concurrency grid through the student's engine on this machine.
- `ab`: per-arm feedback means with 95 % intervals from the shadow store.
A check that crashes (a teacher that cannot be reached) fails the gate with the reason.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.config import read_yaml_mapping
from distill import gate_checks as gc
from distill import paired
from distill.answers import Answer, answer_one, engine_config_for, open_engine
from distill.config import format_errors
from distill.data import load_chat_examples, load_prompts
from distill.evaluate import DEFAULT_SUITE
from distill.fidelity import text_fidelity
from distill.tasks import TaskCase, load_suite, spread
from distill.tasks import score as score_tasks
from distill.tasks import summary as task_summary
from serving.engines.config import LlamaCppEngine, TransformersEngine
from shadow.embedder import SemanticEmbedder
from shadow.scoring import exact_match, rouge_l
from shadow.store import SqliteStore, open_store

Messages = list[dict[str, str]]
Progress = Callable[[str], None]


class GateError(ValueError):
    """A bad gate config, suite, data file or model argument; the text says what to fix."""


# --- config --------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EdgeCasesConfig(_Section):
    enabled: bool = True
    suite: Path | None = Field(None, description="the JSONL suite; skipped without one")
    max_tokens: int = Field(96, ge=1, le=8192, description="answer budget unless a case sets one")
    min_pass_rate: float | None = Field(0.8, ge=0.0, le=1.0, description="student's minimum")
    max_teacher_gap: float | None = Field(
        None, ge=0.0, le=1.0, description="student pass rate >= teacher's minus this")
    refusal_patterns: list[str] = Field(list(gc.DEFAULT_REFUSALS), min_length=1,
                                        description="case-insensitive regexes of a refusal")

    @field_validator("refusal_patterns")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        import re

        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a regex ({e})") from None
        return patterns


class HeldoutConfig(_Section):
    examples: Path | None = Field(None, description="a `protege dataset export` file (.jsonl or "
                                  ".parquet): the last assistant message is the teacher's answer")
    prompts: Path | None = Field(None, description="a prompt file the teacher answers first")
    limit: int = Field(50, ge=1, le=100_000, description="N examples, evenly spaced in the file")
    max_tokens: int = Field(128, ge=1, le=8192, description="answer budget (student, teacher)")

    @model_validator(mode="after")
    def _one(self) -> HeldoutConfig:
        if self.examples is not None and self.prompts is not None:
            raise ValueError("heldout: set at most one of `examples` and `prompts`")
        return self


class FidelityConfig(_Section):
    enabled: bool = True
    min_rouge_l: float | None = Field(0.3, ge=0.0, le=1.0)
    min_exact_match: float | None = Field(None, ge=0.0, le=1.0)
    min_semantic: float | None = Field(None, ge=0.0, le=1.0)
    semantic_model: Path | None = Field(Path("models/scorer/all-MiniLM-L6-v2"),
                                        description="used when the folder exists; null: never")


class CalibrationConfig(_Section):
    enabled: bool = True
    bins: int = Field(10, ge=1, le=100)
    n_ctx: int = Field(1024, ge=32, le=32768, description="longest prompt + answer scored")
    overconfident_at: float = Field(0.9, gt=0.0, le=1.0)
    max_ece: float | None = Field(0.1, ge=0.0, le=1.0)
    max_overconfident_wrong: float | None = Field(0.3, ge=0.0, le=1.0)
    labels: bool = Field(True, description="label probabilities on the label edge cases")


class LatencyConfig(_Section):
    enabled: bool = True
    batch_sizes: list[int] = Field([1, 4], min_length=1)
    concurrency: list[int] = Field([1, 2], min_length=1)
    rounds: int = Field(2, ge=1, le=1000, description="batches each client sends per cell")
    max_tokens: int = Field(32, ge=1, le=8192)
    prompts: Path | None = Field(None, description="prompt file; default: held-out prompts")
    max_p95_ttft_s: float | None = Field(5.0, gt=0.0)
    min_tokens_per_s: float | None = Field(None, gt=0.0)

    @field_validator("batch_sizes", "concurrency")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 or x > 1024 for x in v):
            raise ValueError("each value must be in [1, 1024]")
        return v


class ArmSelector(_Section):
    variant: str | None = None
    version: str | None = None


class AbThreshold(_Section):
    max_drop: float = Field(ge=0.0, description="candidate bound vs control mean")
    higher_is_better: bool = True


class AbConfig(_Section):
    enabled: bool = True
    settings: Path | None = Field(None, description="protege settings: its store and metrics")
    store: Path | None = Field(None, description="or a SQLite store file directly")
    route: str | None = None
    since: str | None = Field(None, description="only feedback at or after this ISO time")
    candidate: ArmSelector = ArmSelector()
    control: ArmSelector | None = Field(None, description="default: the candidate's routes' rest")
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    thresholds: dict[str, AbThreshold] = {}

    @field_validator("since")
    @classmethod
    def _iso(cls, v: str | None) -> str | None:
        """As the store keeps times: UTC ISO 8601 with microseconds (naive = UTC)."""
        if v is None:
            return None
        t = datetime.fromisoformat(v)
        t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
        return t.isoformat(timespec="microseconds")

    @model_validator(mode="after")
    def _one(self) -> AbConfig:
        if self.settings is not None and self.store is not None:
            raise ValueError("ab: set at most one of `settings` and `store`")
        return self


class TasksConfig(_Section):
    enabled: bool = True
    suite: Path = Field(DEFAULT_SUITE, description="task suite JSONL (distill.tasks)")
    splits: list[Literal["dev", "gate"]] = Field(["gate"], min_length=1,
                                                 description="gate: never trained on")
    limit: int | None = Field(None, ge=1, description="at most this many cases per family")
    min_pass_rate: float | None = Field(None, ge=0.0, le=1.0, description="student's minimum")
    teacher: bool = Field(False, description="also score the teacher (for the record)")


DEFAULT_MARGINS = {"tasks.pass_rate": 0.02, "tasks.family": 0.15, "edge_cases.pass_rate": 0.10,
                   "fidelity.rouge_l": 0.03, "calibration.ece": 0.02,
                   "latency.p95_ttft_s": 0.25}


class ChampionConfig(_Section):
    """Champion vs challenger: the candidate against the version serving now, same cases."""

    required: bool = Field(False, description="refuse to run the gate without a champion")
    primary: str | None = Field(
        "tasks.pass_rate", description="the metric that must improve significantly; every "
        "metric must be no worse than its margin. null: no worse is enough (a refresh that "
        "need not improve; not for an unattended loop)")
    margins: dict[str, float] = Field(
        DEFAULT_MARGINS, description="metric -> how much worse the challenger may be (in the "
        "metric's units; tasks.family: every tasks.<family>.pass_rate)")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    resamples: int = Field(2000, ge=100, le=100_000, description="paired bootstrap resamples")

    @field_validator("margins")
    @classmethod
    def _margins(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, m in v.items() if not m >= 0]
        if bad:
            raise ValueError(f"margins must be >= 0 ({', '.join(bad)})")
        return {**DEFAULT_MARGINS, **v}

    def margin(self, metric: str) -> float:
        if metric in self.margins:
            return self.margins[metric]
        if metric.startswith("tasks.") and metric.endswith(".pass_rate"):
            return self.margins["tasks.family"]
        return 0.0


class GateConfig(_Section):
    n_ctx: int = Field(2048, ge=128, le=1_048_576, description="llama.cpp context window")
    n_threads: int | None = Field(None, ge=1, le=512, description="llama.cpp threads")
    edge_cases: EdgeCasesConfig = EdgeCasesConfig()
    heldout: HeldoutConfig = HeldoutConfig()
    fidelity: FidelityConfig = FidelityConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    latency: LatencyConfig = LatencyConfig()
    ab: AbConfig = AbConfig()
    tasks: TasksConfig = TasksConfig()
    champion: ChampionConfig = ChampionConfig()


def load_gate_config(path: str | Path) -> GateConfig:
    """Read and validate a gate YAML file; `GateError` has one line per bad field."""
    try:
        data = read_yaml_mapping(path)
        return GateConfig.model_validate(data)
    except ValidationError as e:
        raise GateError(format_errors(e)) from None
    except ValueError as e:
        raise GateError(str(e)) from None


class ChatMessage(_Section):
    role: Literal["system", "user", "assistant"]
    content: str


class EdgeCase(_Section):
    id: str = Field(min_length=1)
    prompt: str | list[ChatMessage]
    expect: gc.Expect
    max_tokens: int | None = Field(None, ge=1, le=8192)

    @property
    def messages(self) -> Messages:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump() for m in self.prompt]


def load_edge_cases(path: str | Path) -> list[EdgeCase]:
    """The suite's cases; `GateError` naming the line and field of the first bad lines."""
    path, cases, problems = Path(path), [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise GateError(f"edge_cases.suite: {path}: cannot read ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            cases.append(EdgeCase.model_validate_json(line))
        except ValidationError as e:
            problems.append(format_errors(e, prefix=f"{path} line {n}: "))
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            problems.append(f"{path}: id {case.id!r} appears twice")
        seen.add(case.id)
    if not cases and not problems:
        problems.append(f"{path}: no edge cases")
    if problems:
        raise GateError("\n".join(problems))
    return cases


# --- the report ----------------------------------------------------------------------------------


@dataclass
class GateReport:
    passed: bool
    failures: list[str]  # stated reasons, e.g. "fidelity.rouge_l 0.210 < 0.300"
    checks: dict[str, Any]  # name -> {"status": passed|failed|skipped|disabled|error, ...}
    meta: dict[str, Any] = field(default_factory=dict)  # models, config, machine, timings

    def to_json(self) -> dict:
        return _plain({"passed": self.passed, "failures": self.failures, "checks": self.checks,
                       "meta": self.meta})


def _plain(x: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN to None, paths to strings."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


# --- validate ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What the checks share: models, config, the loaded suite and held-out data."""

    student: str
    teacher: str | None
    config: GateConfig
    say: Progress
    champion: str | None = None
    cases: list[EdgeCase] | None = None
    tasks: list[TaskCase] | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # paired.compare rows
    # (id, prompt messages, the teacher's answer or None until it answers, answer complete?)
    heldout_rows: list[tuple[str, Messages, str | None, bool]] = field(default_factory=list)
    latency_prompts: list[Messages] = field(default_factory=list)
    ab_settings: Any = None

    def answers(self, model: str, items: Sequence[tuple[Messages, int]],
                what: str | None = None) -> list[Answer]:
        """Greedy answers of `model`, one at a time, through its serving engine; with `what`,
        a progress line every 50 answers."""
        cfg = engine_config_for(model, n_ctx=self.config.n_ctx, n_threads=self.config.n_threads)

        async def run() -> list[Answer]:
            out = []
            async with open_engine(cfg) as engine:
                for m, k, *conditions in items:  # conditions: (response_format, tools)
                    fmt, tools = conditions[0] if conditions else (None, None)
                    out.append(await answer_one(engine, m, max_tokens=k, response_format=fmt,
                                                tools=tools))
                    if what and (len(out) % 50 == 0 or len(out) == len(items)):
                        self.say(f"{what}: {len(out)}/{len(items)} answered")
            return out

        return asyncio.run(run())

    def compare(self, metric: str, champion: Sequence[Any], challenger: Sequence[Any],
                **options: Any) -> None:
        """Record the paired comparison of one metric (champion vs the student)."""
        cfg = self.config.champion
        common = {"margin": cfg.margin(metric), "primary": metric == cfg.primary,
                  "confidence": cfg.confidence, "n_resamples": cfg.resamples}
        if "by_index" in options:
            champion_stat, challenger_stat = options.pop("by_index")
            row = paired.compare_by_index(metric, len(champion), champion_stat, challenger_stat,
                                          **common, **options)
        else:
            row = paired.compare(metric, champion, challenger, **common, **options)
        self.comparisons.append(row)

    @cached_property
    def heldout(self) -> list[tuple[str, Messages, str, bool]]:
        """(id, prompt messages, the teacher's answer, whether it ended rather than being cut);
        the teacher answers a prompt file here, once."""
        rows = self.heldout_rows
        if rows and rows[0][2] is None:
            self.say(f"heldout: the teacher answers {len(rows)} prompts")
            answers = self.answers(self.teacher, [(m, self.config.heldout.max_tokens)
                                                  for _, m, _, _ in rows])
            rows = [(i, m, a.text, a.finish_reason == "stop")
                    for (i, m, _, _), a in zip(rows, answers)]
        return rows


def validate(student: str, teacher: str | None, config: GateConfig, *,
             champion: str | None = None, out_dir: Path | None = None,
             progress: Progress | None = None,
             load_settings: Callable[[Path], Any] | None = None) -> GateReport:
    """Run every enabled check on `student` (and `teacher`); with a `champion` (the version
    serving now) run them on it too and decide champion vs challenger with paired tests; write
    gate.json and gate.html to `out_dir` when given. `load_settings` reads the gateway settings
    that `ab.settings` names (the caller's loader, `ops.settings.load_settings`). Raises
    `GateError` before running anything when an argument, the suite or a data file is bad."""
    started, wall = datetime.now(UTC), time.perf_counter()
    plan = _prepare(student, teacher, champion, config, progress or (lambda _msg: None),
                    load_settings)
    checks: dict[str, Any] = {}
    failures: list[str] = []
    for name, run in (("latency", _latency), ("tasks", _tasks), ("edge_cases", _edge_cases),
                      ("fidelity", _fidelity), ("calibration", _calibration), ("ab", _ab)):
        if not getattr(config, name).enabled:
            checks[name] = {"status": "disabled", "summary": "disabled"}
            continue
        plan.say(f"{name}: running")
        t0 = time.perf_counter()
        try:
            result, failed = run(plan)
        except Exception as e:  # noqa: BLE001 - a check that cannot run fails the gate, stated
            result = {"status": "error", "summary": f"{type(e).__name__}: {e}"}
            failed = [f"{name}: could not run ({type(e).__name__}: {e})"]
        if result["status"] not in ("skipped", "error"):
            result["status"] = "failed" if failed else "passed"
        result["seconds"] = round(time.perf_counter() - t0, 2)
        checks[name], failures = result, failures + failed
        plan.say(f"{name}: {result['status']} ({result['seconds']} s)")
    if champion is not None:
        checks["champion"], failed = _champion(plan)
        failures += failed
        plan.say(f"champion: {checks['champion']['status']} ({checks['champion']['summary']})")
    meta = {"student": student, "teacher": teacher, "champion": champion,
            "started_at": started.isoformat(),
            "duration_s": round(time.perf_counter() - wall, 2), "machine": _machine(),
            "config": config.model_dump(mode="json")}
    report = GateReport(passed=not failures, failures=failures, checks=checks, meta=meta)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def _prepare(student: str, teacher: str | None, champion: str | None, config: GateConfig,
             say: Progress, load_settings: Callable[[Path], Any] | None) -> _Plan:
    if champion is None and config.champion.required:
        raise GateError("champion.required: name the version serving now (--champion); a "
                        "candidate is only promoted when measured against it")
    for role, model in (("student", student), ("teacher", teacher), ("champion", champion)):
        if model is not None:
            try:
                engine_config_for(model)
            except ValueError as e:
                raise GateError(f"{role}: {e}") from None
    plan = _Plan(student, teacher, config, say, champion=champion)
    if config.edge_cases.enabled and config.edge_cases.suite is not None:
        plan.cases = load_edge_cases(config.edge_cases.suite)
    if config.tasks.enabled:
        t = config.tasks
        try:
            plan.tasks = load_suite(t.suite, splits=t.splits, limit=t.limit)
        except ValueError as e:
            raise GateError(f"tasks: {e}") from None
    h = config.heldout
    try:
        if h.examples is not None:
            rows = spread(load_chat_examples(h.examples), h.limit)
            plan.heldout_rows = [(str(r.get("id") or i), r["messages"][:-1],
                                  r["messages"][-1]["content"],
                                  r.get("teacher_finish_reason") != "length")
                                 for i, r in enumerate(rows, 1)]
        elif h.prompts is not None:
            if teacher is None:
                raise GateError("heldout.prompts: the teacher answers these prompts; pass "
                                "--teacher, or give heldout.examples (answered pairs)")
            plan.heldout_rows = [(str(i), m, None, False) for i, m in
                                 enumerate(spread(load_prompts(h.prompts), h.limit), 1)]
        if config.latency.enabled and config.latency.prompts is not None:
            plan.latency_prompts = load_prompts(config.latency.prompts)
    except (ValueError, OSError) as e:
        raise GateError(str(e)) from None
    if not plan.latency_prompts:
        plan.latency_prompts = ([m for _, m, _, _ in plan.heldout_rows]
                                or [c.messages for c in plan.cases or ()]
                                or [[{"role": "user", "content": "Say hello in one sentence."}]])
    if config.ab.enabled and config.ab.settings is not None:
        if load_settings is None:
            raise GateError("ab.settings: this caller cannot read gateway settings; "
                            "give ab.store (the SQLite store file) instead")
        try:
            plan.ab_settings = load_settings(config.ab.settings)
        except ValueError as e:
            raise GateError(f"ab.settings: {config.ab.settings}: {e}") from None
    return plan


def _skipped(reason: str) -> tuple[dict[str, Any], list[str]]:
    return {"status": "skipped", "summary": reason}, []


# --- checks --------------------------------------------------------------------------------------


def _edge_cases(plan: _Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.edge_cases
    if plan.cases is None:
        return _skipped("no suite (set edge_cases.suite)")
    items = [(c.messages, c.max_tokens or cfg.max_tokens) for c in plan.cases]
    sides = {"student": plan.answers(plan.student, items)}
    if plan.champion is not None:
        sides["champion"] = plan.answers(plan.champion, items)
    if plan.teacher is not None:
        sides["teacher"] = plan.answers(plan.teacher, items)
    rows, rates = [], {}
    for i, case in enumerate(plan.cases):
        row = {"id": case.id, "kind": case.expect.kind, "prompt": case.messages[-1]["content"],
               "expect": case.expect.model_dump(by_alias=True, exclude_defaults=True)}
        for side, answers in sides.items():
            ok, why = gc.check_answer(answers[i].text, case.expect, cfg.refusal_patterns)
            row[side] = {"answer": answers[i].text, "passed": ok, "why": why}
        rows.append(row)
    for side in sides:
        rates[side] = sum(r[side]["passed"] for r in rows) / len(rows)
    if plan.champion is not None:
        plan.compare("edge_cases.pass_rate", [r["champion"]["passed"] for r in rows],
                     [r["student"]["passed"] for r in rows])
    failures = [gc.below("edge_cases.pass_rate", rates["student"], cfg.min_pass_rate)]
    notes = []
    if cfg.max_teacher_gap is not None:
        if "teacher" in rates:
            gap = rates["teacher"] - rates["student"]
            failures.append(gc.above("edge_cases.teacher_gap", gap, cfg.max_teacher_gap,
                                     f" (student {gc.fmt(rates['student'])}, teacher "
                                     f"{gc.fmt(rates['teacher'])})"))
        else:
            notes.append("max_teacher_gap not checked: no teacher")
    n = len(rows)
    summary = ", ".join(f"{s} {sum(r[s]['passed'] for r in rows)}/{n}" for s in sides)
    return ({"status": "", "summary": summary, "cases": n, "pass_rate": rates, "rows": rows,
             "notes": notes}, [f for f in failures if f])


def _fidelity(plan: _Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.fidelity
    rows = plan.heldout
    if not rows:
        return _skipped("no held-out pairs (set heldout.examples or heldout.prompts)")
    answers = [a.text for a in plan.answers(plan.student, [(m, plan.config.heldout.max_tokens)
                                                           for _, m, _, _ in rows])]
    references = [ref for _, _, ref, _ in rows]
    embed, notes = None, []
    if cfg.semantic_model is not None and (cfg.semantic_model / "config.json").is_file():
        embed = SemanticEmbedder(cfg.semantic_model)
    elif cfg.min_semantic is not None:
        notes.append(f"no semantic model at {cfg.semantic_model}")
    scores = text_fidelity(answers, references, embed=embed)
    scores["exact_match"] = sum(exact_match(a, r) for a, r in zip(answers, references)) / len(rows)
    pairs = [{"id": i, "prompt": m[-1]["content"], "student": a, "teacher": r,
              "rouge_l": rouge_l(a, r)} for (i, m, r, _), a in zip(rows, answers)]
    if plan.champion is not None:
        held = [a.text for a in plan.answers(plan.champion, [
            (m, plan.config.heldout.max_tokens) for _, m, _, _ in rows])]
        for pair, a in zip(pairs, held):
            pair |= {"champion": a, "champion_rouge_l": rouge_l(a, pair["teacher"])}
        plan.compare("fidelity.rouge_l", [p["champion_rouge_l"] for p in pairs],
                     [p["rouge_l"] for p in pairs])
    failures = [gc.below(f"fidelity.{k}", scores[k], getattr(cfg, f"min_{k}"))
                for k in ("rouge_l", "exact_match", "semantic")]
    if cfg.min_semantic is not None and scores["semantic"] is None:
        failures.append(f"fidelity.semantic: not measured ({notes[0]}) but min_semantic is set")
    summary = ", ".join(f"{k} {gc.fmt(v)}" for k, v in scores.items() if v is not None)
    return ({"status": "", "summary": f"{summary} over {len(rows)} pairs", "pairs": len(rows),
             **scores, "rows": pairs, "notes": notes}, [f for f in failures if f])


def _scorer(model: str, plan: _Plan) -> _GgufScorer | _HfScorer | None:
    """A token-probability scorer for `model`; None when its engine has none (remote, fake)."""
    engine = engine_config_for(model)
    if isinstance(engine, LlamaCppEngine):
        return _GgufScorer(engine.path, plan.config.calibration.n_ctx, plan.config.n_threads)
    if isinstance(engine, TransformersEngine):
        return _HfScorer(engine.model)
    return None


def _token_scores(scorer: _GgufScorer | _HfScorer, plan: _Plan
                  ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per held-out pair: the confidence and correctness of each teacher token under the
    model (None: longer than calibration.n_ctx)."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for _, messages, reference, complete in plan.heldout:
        ids, counted = scorer.encode(messages, reference, end=complete)
        out.append(None if len(ids) > plan.config.calibration.n_ctx
                   else gc.token_confidence(scorer.logprobs(ids), ids, counted))
    return out


def _ece_of(scores: list[tuple[np.ndarray, np.ndarray]], bins: int) -> Callable[[np.ndarray],
                                                                               float]:
    """ECE over the tokens of the chosen cases (for the paired bootstrap)."""
    def ece(index: np.ndarray) -> float:
        c = np.concatenate([scores[i][0] for i in index])
        k = np.concatenate([scores[i][1] for i in index])
        return gc.expected_calibration_error(c, k, bins) if len(c) else float("nan")
    return ece


def _calibration(plan: _Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.calibration
    engine = engine_config_for(plan.student)
    label_cases = [c for c in plan.cases or () if c.expect.kind == "label"] if cfg.labels else []
    if engine.engine not in ("llamacpp", "transformers"):
        return _skipped("needs the student's token probabilities: a .gguf file or a model "
                        f"folder (not {engine.engine})")
    if not plan.heldout and not label_cases:
        return _skipped("no held-out pairs and no label edge cases")
    scorer = _scorer(plan.student, plan)
    try:
        scores = _token_scores(scorer, plan)
        labels = [_label_probs(scorer, case) for case in label_cases]
    finally:
        scorer.close()
    confidence = [x for s in scores if s is not None for x in s[0].tolist()]
    correct = [x for s in scores if s is not None for x in s[1].tolist()]
    too_long = sum(s is None for s in scores)
    notes = []
    if plan.champion is not None and plan.heldout:
        champion_scorer = _scorer(plan.champion, plan)
        if champion_scorer is None:
            notes.append("calibration.ece not compared: the champion has no token "
                         "probabilities")
        else:
            try:
                theirs = _token_scores(champion_scorer, plan)
            finally:
                champion_scorer.close()
            both = [(a, b) for a, b in zip(theirs, scores)
                    if a is not None and b is not None and len(a[0]) and len(b[0])]
            if both:
                plan.compare("calibration.ece", both, both, higher_is_better=False, by_index=(
                    _ece_of([a for a, _ in both], cfg.bins),
                    _ece_of([b for _, b in both], cfg.bins)))
    result: dict[str, Any] = {"status": "", "tokens": len(confidence), "too_long": too_long,
                              "labels": labels, "notes": notes}
    failures: list[str | None] = []
    if confidence:
        result |= {"ece": gc.expected_calibration_error(confidence, correct, cfg.bins),
                   "accuracy": float(np.mean(correct)),
                   "mean_confidence": float(np.mean(confidence)),
                   "overconfident_wrong": gc.overconfident_wrong(confidence, correct,
                                                                 cfg.overconfident_at),
                   "reliability": gc.reliability(confidence, correct, cfg.bins)}
        failures = [gc.above("calibration.ece", result["ece"], cfg.max_ece),
                    gc.above("calibration.overconfident_wrong", result["overconfident_wrong"],
                             cfg.max_overconfident_wrong)]
        result["summary"] = (f"ECE {gc.fmt(result['ece'])}, top-1 {gc.fmt(result['accuracy'])}, "
                             f"wrong at >= {cfg.overconfident_at}: "
                             f"{gc.fmt(result['overconfident_wrong'])} over {len(confidence)} "
                             "tokens")
    else:
        result["summary"] = "no held-out tokens scored"
    if labels:
        conf = [max(r["probs"].values()) for r in labels]
        hits = [r["predicted"] == r["expected"] for r in labels]
        result["label_ece"] = gc.expected_calibration_error(conf, hits, cfg.bins)
        result["label_accuracy"] = sum(hits) / len(hits)
        result["summary"] += (f"; labels: accuracy {gc.fmt(result['label_accuracy'])}, "
                              f"ECE {gc.fmt(result['label_ece'])} over {len(labels)} cases")
    return result, [f for f in failures if f]


def _label_probs(scorer: _GgufScorer | _HfScorer, case: EdgeCase) -> dict[str, Any]:
    """P(label | prompt) over the case's label set, from each label's sequence logprob."""
    scores = []
    for label in case.expect.labels:
        ids, counted = scorer.encode(case.messages, label, end=False)
        scores.append(gc.sequence_logprob(scorer.logprobs(ids), ids, counted))
    probs = dict(zip(case.expect.labels, gc.softmax(scores)))
    return {"id": case.id, "expected": case.expect.label, "probs": probs,
            "predicted": max(probs, key=probs.get)}


def _latency(plan: _Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.latency
    baseline_kb = _reset_peak_memory()
    cells, ttft = _grid(plan.student, plan)
    memory = {"baseline_rss_mb": _mb(baseline_kb), "peak_rss_mb": _mb(_status_kb("VmHWM")),
              "gpu_peak_mb": _gpu_peak_mb()}
    result: dict[str, Any] = {"status": "", "cells": cells, "memory": memory}
    if plan.champion is not None:
        plan.say("latency: the same grid on the champion")
        result["champion_cells"], theirs = _grid(plan.champion, plan)
        timed = [(a, b) for a, b in zip(theirs, ttft) if a is not None and b is not None]
        if timed:
            champion_s, student_s = (np.array([t[i] for t in timed]) for i in (0, 1))
            plan.compare("latency.p95_ttft_s", champion_s, student_s, higher_is_better=False,
                         by_index=(lambda ix: float(np.percentile(champion_s[ix], 95)),
                                   lambda ix: float(np.percentile(student_s[ix], 95))))
    failures = []
    for c in cells:
        where = f" (batch {c['batch']} x concurrency {c['concurrency']})"
        p95 = c["ttft_ms"]["p95"]
        failures += [gc.above("latency.p95_ttft_s", None if p95 is None else p95 / 1000,
                              cfg.max_p95_ttft_s, where),
                     gc.below("latency.tokens_per_s", c["tokens_per_s"], cfg.min_tokens_per_s,
                              where)]
    p95s = [c["ttft_ms"]["p95"] for c in cells if c["ttft_ms"]["p95"] is not None]
    tps = [c["tokens_per_s"] for c in cells if c["tokens_per_s"] is not None]
    result["summary"] = (f"{len(cells)} cells: p95 TTFT {gc.fmt(min(p95s, default=None))}-"
                         f"{gc.fmt(max(p95s, default=None))} ms, "
                         f"{gc.fmt(min(tps, default=None))}-{gc.fmt(max(tps, default=None))} "
                         f"tok/s, peak RSS {gc.fmt(memory['peak_rss_mb'])} MB")
    return result, [f for f in failures if f]


def _grid(model: str, plan: _Plan) -> tuple[list[dict[str, Any]], list[float | None]]:
    """The latency grid of `model`: one summary per cell, and every request's time to first
    token in a fixed order (cell, client, round, slot), so two models pair request by request."""
    cfg = plan.config.latency
    engine = engine_config_for(model, n_ctx=plan.config.n_ctx, n_threads=plan.config.n_threads)
    prompts = plan.latency_prompts
    cells, ttft = [], []

    async def run() -> None:
        async with open_engine(engine) as e:
            await answer_one(e, prompts[0], max_tokens=cfg.max_tokens)  # warm-up, not counted
            for batch in cfg.batch_sizes:
                for clients in cfg.concurrency:
                    plan.say(f"latency: batch {batch} x concurrency {clients}")
                    summary, answers = await _cell(e, prompts, batch, clients, cfg)
                    cells.append({"batch": batch, "concurrency": clients, **summary})
                    ttft.extend(a.ttft_s for a in answers)

    asyncio.run(run())
    return cells, ttft


async def _cell(engine: Any, prompts: list[Messages], batch: int, clients: int,
                cfg: LatencyConfig) -> tuple[dict[str, Any], list[Answer]]:
    """`clients` in parallel, each sending `rounds` groups of `batch` prompts at once; the
    summary and the answers in slot order."""
    answers: dict[int, Answer] = {}

    async def client(k: int) -> None:
        for r in range(cfg.rounds):
            start = (k * cfg.rounds + r) * batch
            group = [prompts[(start + j) % len(prompts)] for j in range(batch)]
            got = await asyncio.gather(*(answer_one(engine, p, max_tokens=cfg.max_tokens)
                                         for p in group))
            answers.update((start + j, a) for j, a in enumerate(got))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    ordered = [answers[i] for i in sorted(answers)]
    return (gc.latency_summary([a.ttft_s for a in ordered], [a.inter_token_s for a in ordered],
                               [a.completion_tokens for a in ordered], wall), ordered)


def _tasks(plan: _Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.tasks
    cases = plan.tasks or []
    items = [(c.messages, c.max_tokens, c.conditions()) for c in cases]
    sides = {"student": plan.answers(plan.student, items, "tasks: student")}
    if plan.champion is not None:
        sides["champion"] = plan.answers(plan.champion, items, "tasks: champion")
    if plan.teacher is not None and cfg.teacher:
        sides["teacher"] = plan.answers(plan.teacher, items, "tasks: teacher")
    scored = {side: score_tasks(cases, [a.text for a in answers])
              for side, answers in sides.items()}
    summaries = {side: task_summary(rows, plan.config.champion.confidence)
                 for side, rows in scored.items()}
    rows = [{"id": c.id, "family": c.family, "kind": c.kind, "prompt": c.messages[-1]["content"],
             **{side: {k: scored[side][i][k] for k in ("answer", "passed", "why")}
                for side in sides}} for i, c in enumerate(cases)]
    if plan.champion is not None:
        ours, theirs = scored["student"], scored["champion"]
        plan.compare("tasks.pass_rate", [r["passed"] for r in theirs],
                     [r["passed"] for r in ours])
        for family in summaries["student"]["families"]:
            pick = [i for i, c in enumerate(cases) if c.family == family]
            plan.compare(f"tasks.{family}.pass_rate", [theirs[i]["passed"] for i in pick],
                         [ours[i]["passed"] for i in pick])
    rate = summaries["student"]["overall"]["rate"]
    failures = [gc.below("tasks.pass_rate", rate, cfg.min_pass_rate)]
    summary = ", ".join(f"{side} {s['overall']['passed']}/{s['overall']['n']} "
                        f"({gc.fmt(s['overall']['rate'])})" for side, s in summaries.items())
    return ({"status": "", "summary": summary, "cases": len(cases),
             "splits": plan.config.tasks.splits, "suite": sorted({c.suite for c in cases}),
             "pass_rate": summaries, "rows": rows}, [f for f in failures if f])


def _champion(plan: _Plan) -> tuple[dict[str, Any], list[str]]:
    """The paired verdict over every metric compared: no worse than the champion beyond each
    margin, and significantly better on the primary metric."""
    cfg = plan.config.champion
    rows = plan.comparisons
    passed, reasons = paired.verdict(rows)
    if cfg.primary is None:
        reasons = [r for r in reasons if not r.startswith("no primary metric")]
        passed = not reasons
    elif cfg.primary not in {r["metric"] for r in rows}:
        reasons = [f"champion.primary: {cfg.primary} was not measured (is its check enabled?)",
                   *[r for r in reasons if not r.startswith("no primary metric")]]
        passed = False
    better = [r["metric"] for r in rows if r["decision"] == "better"]
    worse = [r["metric"] for r in rows if r["decision"] == "worse"]
    summary = (f"{'promote' if passed else 'keep the champion'}: {len(rows)} metrics compared"
               + (f"; better: {', '.join(better)}" if better else "")
               + (f"; worse: {', '.join(worse)}" if worse else ""))
    return ({"status": "passed" if passed else "failed", "summary": summary,
             "champion": plan.champion, "primary": cfg.primary,
             "confidence": cfg.confidence, "rows": rows},
            [f"champion: {r}" for r in reasons])


def _ab(plan: _Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.ab
    if cfg.candidate.variant is None and cfg.candidate.version is None:
        return _skipped("no candidate (set ab.candidate.variant or .version)")
    types: dict[str, str] = {}
    if plan.ab_settings is not None:
        s = plan.ab_settings
        if s.shadow.store == "sqlite" and not s.resolve_path(s.shadow.store_path).is_file():
            return _skipped(f"no store at {s.shadow.store_path}")
        store = open_store(s.shadow, s.base_dir)
        types = {name: m.type for name, m in s.feedback.items()}
    elif cfg.store is not None:
        if not cfg.store.is_file():
            return _skipped(f"no store at {cfg.store}")

        store = SqliteStore(cfg.store)
    else:
        return _skipped("no store (set ab.settings or ab.store)")
    candidate = {"route": cfg.route, **cfg.candidate.model_dump()}
    control = None if cfg.control is None else {"route": cfg.route, **cfg.control.model_dump()}
    metrics = gc.ab_summary(store.iter_feedback(since=cfg.since), candidate, control, types=types,
                            confidence=cfg.confidence)
    if not any(m["candidate"] for m in metrics.values()):
        return _skipped("no feedback for the candidate yet")
    failures, notes = [], []
    for name, th in cfg.thresholds.items():
        m = metrics.get(name) or {"candidate": None, "control": None}
        cand, ctrl = m["candidate"], m["control"]
        if cand is None or ctrl is None or cand["low"] is None:
            notes.append(f"{name}: not checked (too little feedback on an arm)")
            continue
        if th.higher_is_better and cand["low"] < ctrl["mean"] - th.max_drop:
            failures.append(f"ab.{name} candidate lower bound {gc.fmt(cand['low'])} < control "
                            f"mean {gc.fmt(ctrl['mean'])} - {gc.fmt(th.max_drop)}")
        if not th.higher_is_better and cand["high"] > ctrl["mean"] + th.max_drop:
            failures.append(f"ab.{name} candidate upper bound {gc.fmt(cand['high'])} > control "
                            f"mean {gc.fmt(ctrl['mean'])} + {gc.fmt(th.max_drop)}")
    summary = "; ".join(
        f"{k}: " + " vs ".join(f"{arm} {gc.fmt(v[arm]['mean'])} (n={v[arm]['n']})"
                               for arm in ("candidate", "control") if v[arm])
        for k, v in metrics.items())
    return {"status": "", "summary": summary, "metrics": metrics, "notes": notes}, failures


# --- the student's token probabilities -----------------------------------------------------------


class _GgufScorer:
    """Teacher-forced log-probabilities from a GGUF (llama.cpp, `logits_all`), prompts rendered
    with the GGUF's chat template as the llamacpp engine renders them."""

    def __init__(self, path: str, n_ctx: int, n_threads: int | None):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        threads = n_threads or len(os.sched_getaffinity(0))
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=True, verbose=False)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise GateError(f"{path} has no chat template (tokenizer.chat_template)")
        model = self.llm._model
        eos, bos = model.token_eos(), model.token_bos()
        self.eos = eos
        self.chat = Jinja2ChatFormatter(
            template, eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "", add_generation_prompt=True)

    def encode(self, messages: Messages, answer: str, *, end: bool) -> tuple[list[int], list[bool]]:
        """Prompt tokens, then the answer tokenized on its own (and EOS when `end`)."""
        prompt = self.llm.tokenize(self.chat(messages=messages).prompt.encode(), add_bos=False,
                                   special=True)
        tail = self.llm.tokenize(answer.encode(), add_bos=False, special=False)
        tail += [self.eos] if end and self.eos != -1 else []
        return prompt + tail, [False] * len(prompt) + [True] * len(tail)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return gc.log_softmax(self.llm.scores[:len(ids)])

    def close(self) -> None:
        self.llm.close()


class _HfScorer:
    """Teacher-forced log-probabilities from a Hugging Face model folder (transformers)."""

    def __init__(self, folder: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if not self.tokenizer.chat_template:
            raise GateError(f"{folder}: the tokenizer has no chat template")

    def encode(self, messages: Messages, answer: str, *, end: bool) -> tuple[list[int], list[bool]]:
        """Prompt tokens, then the answer tokenized on its own (and EOS when `end`)."""
        tok = self.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        tail = tok(answer, add_special_tokens=False)["input_ids"]
        tail += [tok.eos_token_id] if end and tok.eos_token_id is not None else []
        return prompt + tail, [False] * len(prompt) + [True] * len(tail)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids])).logits[0]
        return self.torch.log_softmax(logits.double(), dim=-1).numpy()

    def close(self) -> None:
        self.model = None


# --- the machine ---------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def _reset_peak_memory() -> int | None:
    """Reset the process's RSS high-water mark (and torch's CUDA peak); the RSS now, in kB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return _status_kb("VmRSS")


def _gpu_peak_mb() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    torch = sys.modules.get("torch")
    gpu = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "gpu": gpu,
            "python": platform.python_version()}


# --- gate.json and gate.html ---------------------------------------------------------------------

def write_report(report: GateReport, out_dir: str | Path) -> tuple[Path, Path]:
    """`out_dir`/gate.json and `out_dir`/gate.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    (out / "gate.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (out / "gate.html").write_text(gc.render_html(data), encoding="utf-8")
    return out / "gate.json", out / "gate.html"


def summary_rows(report: GateReport) -> list[tuple[str, str, str]]:
    """(check, status, summary) per check, for the terminal."""
    return [(k, v["status"], v.get("summary", "")) for k, v in report.checks.items()]
