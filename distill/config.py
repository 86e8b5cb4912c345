"""The knowledge-distillation recipe's configuration: one YAML file, validated by pydantic.

Owns what a recipe run may be told and how a bad file is reported: `load_recipe(path)` returns a
`RecipeConfig` or raises `RecipeError` whose text is one line per bad field,
``path: value (what is allowed)``. It does not load models or data (the recipe does) and does
not check that files exist (paths produced by earlier stages do not exist yet when it runs).

    student: {init_from: {keep_layers: [0, 3, 6]}}   # or {path: a HF model folder}
    teacher: {gguf: models/student/SmolLM2-135M-Instruct.Q4_1.gguf}  # or {path: a HF folder}
    data: {prompts: examples/prompts/enterprise.jsonl, teacher_answers: {max_new_tokens: 48}}
    strategy: logit                 # sequence | logit | topk | on_policy | layerwise
    loss: {kind: forward, alpha: 0.5, temperature: 2.0}
    optim: {lr: 1.0e-4, max_steps: 100, batch_size: 8}
    output_dir: data/distill/demo

Relative paths are relative to the working directory; `RecipeConfig.resolved()`
makes them absolute, as Ray workers run elsewhere.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.config import read_yaml_mapping, shown

STRATEGIES = ("sequence", "logit", "topk", "on_policy", "layerwise")
NEEDS_TEACHER_LOGITS = ("logit", "on_policy", "layerwise")


class RecipeError(ValueError):
    """A user error (config, files, data, a diverged run); the text says how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudentInit(_Section):
    teacher: Path | None = Field(
        None, description="HF model folder to cut the student from; default: the recipe's teacher")
    keep_layers: list[int] = Field(
        min_length=1, description="teacher decoder layers the student keeps, in order (0-based)")

    @field_validator("keep_layers")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v) or any(b <= a for a, b in pairwise(v)):
            raise ValueError("layer indices must be >= 0 and strictly increasing")
        return v


class StudentConfig(_Section):
    path: Path | None = Field(None, description="a Hugging Face model folder (with tokenizer), "
                              "or a .gguf file (dequantized to fp32)")
    init_from: StudentInit | None = Field(None, description="build the student by layer dropping")

    @model_validator(mode="after")
    def _one(self) -> StudentConfig:
        if (self.path is None) == (self.init_from is None):
            raise ValueError("student: set exactly one of `path` (a model folder) and "
                             "`init_from` (layer dropping)")
        return self


class TeacherConfig(_Section):
    path: Path | None = Field(None, description="a Hugging Face model folder (with tokenizer)")
    gguf: Path | None = Field(
        None, description="a .gguf file, dequantized to fp32 by transformers; tokenizer from it")

    @model_validator(mode="after")
    def _one(self) -> TeacherConfig:
        if (self.path is None) == (self.gguf is None):
            raise ValueError("teacher: set exactly one of `path` (a model folder) and `gguf` "
                             "(a .gguf file)")
        return self

    @property
    def id(self) -> str:
        return str(self.path if self.path is not None else self.gguf)


class TeacherAnswers(_Section):
    max_new_tokens: int = Field(64, ge=1, le=4096, description="longest answer generated")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    batch_size: int = Field(8, ge=1, le=256, description="prompts generated at once")


class DataConfig(_Section):
    train: Path | None = Field(
        None, description="a shadow export (.jsonl or .parquet) whose answers are the teacher's")
    prompts: Path | None = Field(
        None, description="a prompt file (.txt or .jsonl); the teacher answers them first")
    teacher_answers: TeacherAnswers = Field(
        default_factory=TeacherAnswers, description="how the teacher answers `prompts`")
    validation: Path | None = Field(None, description="a validation export; else a hash split")
    validation_share: float = Field(
        0.05, ge=0.0, le=0.5, description="share of prompts held out when `validation` is unset")
    max_length: int = Field(512, ge=8, le=32768, description="tokens per example (cut from the end)")
    packing: bool = Field(False, description="concatenate examples into max_length rows")

    @model_validator(mode="after")
    def _one(self) -> DataConfig:
        if (self.train is None) == (self.prompts is None):
            raise ValueError("data: set exactly one of `train` (a shadow export) and `prompts` "
                             "(a prompt file the teacher answers)")
        problems = []
        for name, allowed in (("train", (".jsonl", ".parquet")), ("validation",
                              (".jsonl", ".parquet")), ("prompts", (".txt", ".jsonl"))):
            path = getattr(self, name)
            if path is not None and path.suffix not in allowed:
                problems.append(f"data.{name}: {str(path)!r} (must end with "
                                f"{' or '.join(allowed)})")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class LossConfig(_Section):
    kind: Literal["forward", "reverse", "jsd"] = Field(
        "forward", description="divergence to the teacher: KL(t||s), KL(s||t) or generalised JSD")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the teacher term; "
                         "1 - alpha goes to cross-entropy on the teacher's answer")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="softens both distributions")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture weight (kind: jsd)")


class OnPolicyConfig(_Section):
    lmbda: float = Field(0.5, ge=0.0, le=1.0,
                         description="share of batches where the student writes the answer")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="longest student answer")
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="student sampling temperature")


class LayerwiseConfig(_Section):
    layer_map: dict[int, int] | None = Field(
        None, description="student -> teacher hidden-state index (0 = embeddings, i = after "
        "layer i); default with student.init_from: each kept layer to its source")
    weight: float = Field(1.0, ge=0.0, le=1000.0, description="hidden loss weight next to logits")
    kind: Literal["mse", "cosine"] = Field("mse", description="hidden-state distance")


class OptimConfig(_Section):
    lr: float = Field(5e-5, gt=0.0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup, then cosine decay to 0")
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, le=4096, description="examples (or packed rows) per micro-batch")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="clip; null = no clipping")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="autocast dtype; weights stay fp32")
    seed: int = Field(0, ge=0)


class RecipeConfig(_Section):
    student: StudentConfig
    teacher: TeacherConfig | None = Field(
        None, description="optional only for strategy sequence/topk on a prepared export")
    data: DataConfig
    strategy: Literal[STRATEGIES] = Field("logit", description="how the student learns")
    loss: LossConfig = Field(default_factory=LossConfig)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    layerwise: LayerwiseConfig = Field(default_factory=LayerwiseConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval_every: int = Field(50, ge=1, description="validate every N steps (and at the end)")
    save_every: int = Field(100, ge=1, description="checkpoint every N steps (last 2 kept)")
    output_dir: Path = Field(description="checkpoints/, model/, manifest.json, loss_curve.png")
    workers: int = Field(1, ge=1, le=256, description="data-parallel Ray Train workers")
    stages: list[dict[str, Any]] = Field(
        default_factory=list, description="progressive: overrides per stage; each stage's model "
        "teaches the next; stage i writes to output_dir/stage-i unless it sets output_dir; "
        "student and teacher are replaced whole, other sections merge key by key")

    @model_validator(mode="after")
    def _consistent(self) -> RecipeConfig:
        problems = []
        if self.teacher is None:
            if self.strategy in NEEDS_TEACHER_LOGITS:
                problems.append(f"teacher: missing (strategy {self.strategy} needs a teacher with "
                                "the student's tokenizer; without one use `strategy: sequence`)")
            if self.data.prompts is not None:
                problems.append("teacher: missing (data.prompts needs a teacher to answer them)")
            if self.student.init_from is not None and self.student.init_from.teacher is None:
                problems.append("student.init_from.teacher: missing (there is no recipe teacher "
                                "to cut the student from)")
        if self.strategy == "topk" and self.data.train is None:
            problems.append("data.train: missing (strategy topk learns from the teacher_logprobs "
                            "stored in a shadow export)")
        if self.strategy in ("topk", "on_policy") and self.data.packing:
            problems.append(f"data.packing: True (not supported with strategy {self.strategy}; "
                            "set it to false)")
        if (self.strategy == "layerwise" and self.layerwise.layer_map is None
                and self.student.init_from is None):
            problems.append("layerwise.layer_map: missing (required for strategy layerwise "
                            "unless student.init_from gives keep_layers)")
        for i, stage in enumerate(self.stages, 1):
            if "stages" in stage:
                problems.append(f"stages.{i}.stages: set (stages do not nest)")
            if i > 1 and "teacher" in stage:
                problems.append(f"stages.{i}.teacher: set (stage {i}'s teacher is stage {i - 1}'s "
                                "model; remove it)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolved(self) -> RecipeConfig:
        """A copy whose relative paths are absolute (from the working directory)."""
        data = self.model_dump(mode="json")
        _absolute(data, ("student", "path"), ("student", "init_from", "teacher"),
                  ("teacher", "path"), ("teacher", "gguf"), ("data", "train"),
                  ("data", "prompts"), ("data", "validation"), ("output_dir",))
        return RecipeConfig.model_validate(data)

    def stage_configs(self) -> list[RecipeConfig]:
        """The runs to make in order: [self] without stages, else one config per stage."""
        if not self.stages:
            return [self]
        base = self.model_dump(mode="json", exclude={"stages"})
        runs: list[RecipeConfig] = []
        for i, override in enumerate(self.stages, 1):
            data = _merge(base, override)
            if "output_dir" not in override:
                data["output_dir"] = str(Path(base["output_dir"]) / f"stage-{i}")
            if runs:  # the previous stage's student teaches this one
                data["teacher"] = {"path": str(Path(runs[-1].output_dir) / "model")}
            try:
                runs.append(RecipeConfig.model_validate(data))
            except ValidationError as e:
                raise RecipeError(format_errors(e, prefix=f"stages.{i}.")) from None
        return runs


def load_recipe(path: str | Path, **overrides: Any) -> RecipeConfig:
    """Read and validate a recipe YAML file; `overrides` replace top-level keys."""
    try:
        data = read_yaml_mapping(path)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    try:
        return RecipeConfig.model_validate({**data, **overrides})
    except ValidationError as e:
        raise RecipeError(format_errors(e)) from None


def format_errors(err: ValidationError, prefix: str = "") -> str:
    """One line per bad field: ``path: value (what is allowed)``."""
    lines = []
    for e in err.errors(include_url=False):
        path = prefix + (".".join(str(p) for p in e["loc"]) or "(root)")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"{path}: missing (required)")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            lines.extend(f"{prefix}{line}" for line in msg.splitlines())  # a section's own check
        else:
            lines.append(f"{path}: {shown(e.get('input'))} ({msg})")
    return "\n".join(lines)


def _merge(base: dict[str, Any], override: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """`override` into `base`, key by key; `student` and `teacher` are replaced whole."""
    out = dict(base)
    for key, value in override.items():
        if top and key in ("student", "teacher"):
            out[key] = value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, top=False)
        else:
            out[key] = value
    return out


def _absolute(data: dict[str, Any], *paths: tuple[str, ...]) -> None:
    for keys in paths:
        node = data
        for key in keys[:-1]:
            node = node.get(key) or {}
        if node.get(keys[-1]) is not None:
            node[keys[-1]] = str(Path(node[keys[-1]]).absolute())
