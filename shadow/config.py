"""The shadow and feedback sections of the settings: where pairs go, what mirroring may cost,
what is redacted, and which feedback metrics clients may send.

Which routes are mirrored, to what and how often is part of each route (`serving.config`
`RouteConfig.shadow`); this section holds what all routes share. Pure data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shadow.redact import Redactor, compile_patterns
from shadow.scoring import ScoreWeights

FEEDBACK_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FeedbackMetric(BaseModel):
    """A metric clients may post to `/v1/feedback`: `boolean` (thumbs up/down), `float`
    (a rating, optionally bounded) or `comment` (free text)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["boolean", "float", "comment"]
    min: float | None = Field(None, allow_inf_nan=False, description="float: lowest allowed")
    max: float | None = Field(None, allow_inf_nan=False, description="float: highest allowed")
    description: str = ""

    @model_validator(mode="after")
    def _check_bounds(self) -> FeedbackMetric:
        if self.type != "float" and (self.min is not None or self.max is not None):
            raise ValueError("min and max apply to float metrics only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class RedactionSettings(BaseModel):
    """Personal data replaced before anything is stored (`shadow.redact`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    builtins: list[Literal["email", "phone", "card", "iban", "ip", "ssn", "secret"]] = Field(
        ["email", "phone", "card", "iban", "ip", "ssn", "secret"],
        description="built-in detectors that run (secret: API keys, tokens, JWTs, private keys)")
    patterns: dict[str, str] = Field(
        {}, description="extra detectors: name -> regex; a hit becomes [NAME]")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: dict[str, str]) -> dict[str, str]:
        compile_patterns(patterns)  # a bad regex or name fails at start, naming the pattern
        return patterns

    def redactor(self):
        """The `shadow.redact.Redactor` these settings describe; None when disabled."""
        return Redactor(tuple(self.builtins), dict(self.patterns)) if self.enabled else None


class ShadowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="sqlite: one file (one node); postgres: several nodes")
    postgres_dsn_env: str = Field(
        "PROTEGE_POSTGRES_DSN", description="the environment variable holding the DSN")
    redaction: RedactionSettings = RedactionSettings()
    weights: ScoreWeights = Field(
        ScoreWeights(), description="weight of each score in the combined disagreement")

    store_path: str = Field("data/pairs.sqlite", description="SQLite file of the pairs")
    spill_dir: str = Field("data/spill", description="append-only files while the store is down")
    max_spill_mb: float = Field(1024, gt=0, description="cap on the spill files; records "
                                "beyond it are dropped (counted: spill_full)")
    max_pending: int = Field(32, ge=1, le=100_000,
                             description="mirrors waiting for a slot of one teacher in the "
                             "shadow worker; more are dropped (worker_busy)")
    max_concurrency: int = Field(2, ge=1, le=10_000, description="calls at once to one teacher "
                                 "(a local variant, or a route's remote endpoint)")
    max_in_flight: int | None = Field(
        None, ge=1, le=100_000, description="mirrors an ingress replica lets one teacher have "
        "unfinished; at the limit the teacher is saturated and samples are dropped (counted "
        "`budget`); null: max_concurrency")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="a teacher call gives up after this")
    num_cpus: float = Field(0.0, ge=0, le=64, description="Ray CPUs reserved for the worker")
    nice: int = Field(10, ge=0, le=19, description="CPU niceness of the worker (scoring, store"
                      " writes): it yields to the ingress and the student")
    teacher_top_logprobs: int | None = Field(
        5, ge=0, le=20, description="top-k logprobs asked of every teacher and stored with the "
        "pair (for distillation); null: none (an endpoint that refuses logprobs)")
    semantic_model: str | None = Field(
        "models/scorer/all-MiniLM-L6-v2",
        description="sentence embedder for the semantic score; null: no semantic score")
