"""The distillation sections of the gateway's one `Settings`: where the registry lives.

`registry.root` is a local folder (relative paths from the working directory) or any fsspec URL
(``s3://bucket/protege``); variants marked `promotable` poll it every `poll_s` seconds for the
version `protege promote` chose for them, copying remote artifacts into `cache_dir` first.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RegistrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field("data/registry", description="local folder or fsspec URL of the registry")
    poll_s: float = Field(2.0, gt=0, le=3600, description="how often promotable variants check "
                          "for a new promotion")
    cache_dir: str = Field("data/registry-cache", description="local copies of artifacts "
                           "from a remote registry")


class LoopTriggers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    new_pairs: int | None = Field(500, ge=1, description="run when this many pairs arrived since "
                                  "the last run; null: never for this reason")
    teacher_change: bool = Field(True, description="run when new pairs come from a teacher "
                                 "(model or version) the last run did not learn from")
    every_hours: float | None = Field(None, gt=0, description="run when the last run is older "
                                      "than this; null: no schedule")


class LoopTopup(BaseModel):
    """More soft targets when the shadow holds too few pairs (`distill.topup`)."""

    model_config = ConfigDict(extra="forbid")

    pool: str | None = Field(None, description="a task-suite JSONL of prompts with checks "
                             "(split train, e.g. examples/tasks/pool.jsonl) the teacher answers; "
                             "null: learn from shadow pairs only")
    min_examples: int = Field(400, ge=1, description="top the export's train split up to this "
                              "many examples with teacher answers that pass their check")
    seed: int = Field(0, ge=0, description="the order in which pool prompts are asked")


class LoopSettings(BaseModel):
    """`protege loop`: export -> distill -> quantize -> validate -> register -> promote."""

    model_config = ConfigDict(extra="forbid")

    work_dir: str = Field("data/loop", description="runs/<id>/ (each stage's output), state.json, "
                          "metrics.prom")
    recipe: str | None = Field(None, description="KD recipe YAML (distill/recipes/kd.py); the "
                               "loop sets its data and output_dir")
    quantize: str = Field("gguf-q8_0", description="a `protege quantize --to` format")
    gate: str | None = Field(None, description="gate YAML (`protege validate`); the loop sets "
                             "its held-out pairs. null: versions are registered, never promoted")
    teacher: str | None = Field(None, description="the gate's teacher (a .gguf, a model folder, "
                                "http(s)://host/v1#MODEL); default: the route's shadow teacher")
    route: str | None = Field(None, description="learn from this route's pairs; null: all")
    variant: str | None = Field(None, description="the promotable variant to promote into; "
                                "null: the only promotable one")
    promote: bool = Field(True, description="promote a version that passes the gate")
    min_pairs: int = Field(20, ge=1, description="never run on fewer pairs than this")
    min_disagreement: float | None = Field(None, ge=0, le=1, description="learn only from pairs "
                                           "at least this far apart")
    feedback: list[str] = Field(default_factory=list, description="METRIC=V keeps, METRIC!=V "
                                "drops pairs by feedback (as `protege dataset export --feedback`)")
    validation_share: float = Field(0.1, gt=0, lt=1, description="held out by prompt hash")
    max_attempts: int = Field(3, ge=1, description="a failing run is retried this many times, "
                              "then abandoned")
    check_every_s: float = Field(300, gt=0, description="`protege loop` without --once: how "
                                 "often the triggers are checked")
    pushgateway: str | None = Field(None, description="push the loop's metrics to this "
                                    "Prometheus Pushgateway (host:port) after each run")
    triggers: LoopTriggers = Field(default_factory=LoopTriggers)
    topup: LoopTopup = Field(default_factory=LoopTopup)
