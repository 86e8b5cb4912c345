"""The gate's YAML: every check's section (`GateConfig`, `load_gate_config`) and the
edge-case suite (`EdgeCase`, `load_edge_cases`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.config import read_yaml_mapping
from distill.config import format_errors
from distill.evaluate import DEFAULT_SUITE
from distill.gate import checks as gc

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
