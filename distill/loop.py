"""The closed loop: shadow pairs -> dataset -> distilled student -> quantized -> gated ->
registered -> promoted; `protege loop` runs it on a trigger.

Owns when a run is due (`due`: pure), the stages in order, and the state that makes a run
resumable and idempotent: `<work_dir>/runs/<id>/run.json` records each stage's status and
outputs as it finishes, so a process killed mid-run resumes at the stage it was in (a finished
stage is never redone); registration is looked up by run id before registering, and a
promotion of the version already served changes nothing, so a run never registers or promotes
twice. A failing stage is retried on the next invocation, `max_attempts` times, then the run
is abandoned. `<work_dir>/state.json` keeps the last run's cutoff and teachers (for the
triggers) and the counters behind `metrics.prom` (Prometheus text; pushed to a Pushgateway when
configured). Each stage is done by its own module: `shadow.export`, `distill.recipes.kd`,
`distill.quantize`, `distill.gate`, `distill.registry`. (Over 400 lines: the stages and the
state they resume from are one state machine, read in order.)
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from core.config import read_yaml_mapping
from core.hashing import sha256_file
from core.logging import get_logger
from distill.gate.config import load_gate_config
from distill.gate.run import validate
from distill.manifest import artifact_fields, fidelity_summary
from distill.quantize import held_out, quantize
from distill.recipes.kd import main as run_recipe
from distill.registry import Registry, file_hashes
from distill.tasks import load_suite
from distill.topup import teacher_examples
from distill.train_loop import code_version
from shadow.export import FeedbackFilter, select, write_examples
from shadow.labels import latest
from shadow.store import open_store

STAGES = ("export", "distill", "quantize", "validate", "register", "promote")
QUANTIZE_PROMPTS = 32  # held-out prompts the quantize report compares answers on
OUTCOMES = ("promoted", "registered", "rejected", "failed", "abandoned")
log = get_logger("distill.loop")


class LoopError(RuntimeError):
    """The loop cannot run as configured; the text says what to fix."""


class RunAbandoned(RuntimeError):
    """A stage failed on the run's last allowed attempt: the run is given up, not resumed."""


def due(*, now: datetime, last_run_at: datetime | None, new_pairs: int, total_pairs: int,
        teachers_new: set[str], teachers_last: set[str], new_pairs_at: int | None,
        teacher_change: bool, every_hours: float | None, min_pairs: int) -> list[str]:
    """Why a run is due now (empty: it is not). Never with fewer than `min_pairs` pairs."""
    if total_pairs < min_pairs:
        return []
    reasons = []
    if last_run_at is None:
        reasons.append("first run")
    if new_pairs_at is not None and new_pairs >= new_pairs_at:
        reasons.append(f"{new_pairs} new pairs (>= {new_pairs_at})")
    if teacher_change and teachers_last and teachers_new - teachers_last:
        reasons.append(f"teacher changed to {', '.join(sorted(teachers_new - teachers_last))}")
    if every_hours is not None and last_run_at is not None and (
            now - last_run_at >= timedelta(hours=every_hours)):
        reasons.append(f"schedule (every {every_hours:g} h)")
    return reasons


def teacher_id(model: str, version: str | None) -> str:
    return f"{model}:{version}" if version else model


class Loop:
    """One gateway's loop, from its `Settings`."""

    def __init__(self, settings, *, progress: Callable[[str], None] | None = None,
                 load_settings: Callable[[Path], Any] | None = None):
        """`load_settings` reads other settings files (a gate config's `ab.settings`)."""
        self.s, self.cfg = settings, settings.loop
        self.load_settings = load_settings
        self.work = settings.resolve_path(self.cfg.work_dir)
        self.say = progress or (lambda _msg: None)

    # -- state ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        path = self.work / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        state.setdefault("last", None)
        state.setdefault("counters", {})
        return state

    def _save(self, path: Path, data: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)

    def _count(self, state: dict[str, Any], name: str, **labels: str) -> None:
        key = json.dumps([name, sorted(labels.items())])
        state["counters"][key] = state["counters"].get(key, 0) + 1

    # -- triggers ---------------------------------------------------------------------------

    def check(self) -> tuple[list[str], dict[str, Any]]:
        """(reasons a run is due, what they were computed from)."""
        state = self.state()
        last = state["last"] or {}
        store = self._store()
        total = new = 0
        teachers: set[str] = set()
        for pair in store.iter_pairs(route=self.cfg.route, since=None, until=None,
                                     min_disagreement=self.cfg.min_disagreement):
            total += 1
            if not last.get("cutoff") or pair.created_at >= last["cutoff"]:
                new += 1
                teachers.add(teacher_id(pair.teacher.model, pair.teacher.version))
        t = self.cfg.triggers
        reasons = due(now=datetime.now(UTC),
                      last_run_at=_time(last.get("finished_at")), new_pairs=new,
                      total_pairs=total, teachers_new=teachers,
                      teachers_last=set(last.get("teachers") or ()), new_pairs_at=t.new_pairs,
                      teacher_change=t.teacher_change, every_hours=t.every_hours,
                      min_pairs=self.cfg.min_pairs)
        return reasons, {"pairs": total, "new_pairs": new, "teachers": sorted(teachers)}

    # -- runs -------------------------------------------------------------------------------

    def unfinished(self) -> dict[str, Any] | None:
        runs = self.work / "runs"
        if not runs.is_dir():
            return None
        for path in sorted(runs.glob("*/run.json"), reverse=True):
            run = json.loads(path.read_text())
            if run.get("outcome") is None:
                return run
        return None

    def run_once(self, *, force: bool = False) -> dict[str, Any] | None:
        """Resume the unfinished run, or start one when due (or `force`); None when idle."""
        run = self.unfinished()
        if run is None:
            reasons, facts = self.check()
            if force and facts["pairs"] < self.cfg.min_pairs:
                raise LoopError(f"only {facts['pairs']} pairs (loop.min_pairs is "
                                f"{self.cfg.min_pairs})")
            if not reasons and not force:
                log.info("distill.loop.idle", **facts)
                self.say(f"nothing to do: {facts['pairs']} pairs, {facts['new_pairs']} new")
                return None
            now = datetime.now(UTC)
            run = {"id": now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6],
                   "started_at": now.isoformat(), "cutoff": now.isoformat(timespec="microseconds"),
                   "reasons": reasons or ["forced"], "facts": facts, "attempts": 0,
                   "stages": {}, "outcome": None}
            log.info("distill.loop.started", run=run["id"], reasons=run["reasons"], **facts)
            self.say(f"run {run['id']}: {'; '.join(run['reasons'])}")
        else:
            self.say(f"resuming run {run['id']} (attempt {run['attempts'] + 1})")
            log.info("distill.loop.resumed", run=run["id"], attempt=run["attempts"] + 1)
        return self._advance(run)

    def _advance(self, run: dict[str, Any]) -> dict[str, Any]:
        run_dir = self.work / "runs" / run["id"]
        path = run_dir / "run.json"
        run["attempts"] += 1
        self._save(path, run)
        state = self.state()
        for stage in STAGES:
            done = run["stages"].get(stage, {})
            if done.get("status") in ("done", "skipped"):
                continue
            started = time.monotonic()
            run["stages"][stage] = {"status": "running", "started_at": _now()}
            self._save(path, run)
            self.say(f"{stage} ...")
            try:
                result = getattr(self, f"_{stage}")(run, run_dir)
            except Exception as e:
                run["stages"][stage] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                        "seconds": round(time.monotonic() - started, 2)}
                self._count(state, "protege_loop_stages_total", stage=stage, outcome="failed")
                log.exception("distill.loop.stage_failed", run=run["id"], stage=stage)
                if run["attempts"] >= self.cfg.max_attempts:
                    run["outcome"] = "abandoned"
                self._save(path, run)
                self._finish(state, run, "failed" if run["outcome"] is None else "abandoned")
                if run["outcome"] == "abandoned":
                    raise RunAbandoned(
                        f"run {run['id']} abandoned after {run['attempts']} attempts: {stage} "
                        f"failed: {type(e).__name__}: {e} (the next trigger starts a new run)"
                    ) from e
                raise
            status = result.pop("status", "done")
            run["stages"][stage] = {"status": status, **result,
                                    "seconds": round(time.monotonic() - started, 2),
                                    "finished_at": _now()}
            self._count(state, "protege_loop_stages_total", stage=stage, outcome=status)
            self._save(path, run)
            log.info("distill.loop.stage_completed", run=run["id"], stage=stage, status=status,
                     seconds=run["stages"][stage]["seconds"])
            self.say(f"{stage}: {status} ({run['stages'][stage]['seconds']} s)")
        gate = run["stages"]["validate"]
        promoted = run["stages"]["promote"].get("status") == "done"
        run["outcome"] = ("promoted" if promoted else "rejected" if gate.get("passed") is False
                          else "registered")
        self._save(path, run)
        state["last"] = {"run": run["id"], "cutoff": run["cutoff"], "finished_at": _now(),
                         "teachers": run["facts"]["teachers"] or (state["last"] or {}).get(
                             "teachers", []),
                         "version": run["stages"]["register"].get("version")}
        self._finish(state, run, run["outcome"])
        return run

    def _finish(self, state: dict[str, Any], run: dict[str, Any], outcome: str) -> None:
        self._count(state, "protege_loop_runs_total", outcome=outcome)
        state["last_attempt"] = {"run": run["id"], "outcome": outcome, "at": _now()}
        self._save(self.work / "state.json", state)
        self._export_metrics(state)
        log.info("distill.loop.finished", run=run["id"], outcome=outcome)

    # -- stages -----------------------------------------------------------------------------

    def _export(self, run: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        store = self._store()
        filters = [FeedbackFilter.parse(f) for f in self.cfg.feedback]
        pairs = store.iter_pairs(route=self.cfg.route, since=None, until=run["cutoff"],
                                 min_disagreement=self.cfg.min_disagreement)
        out = run_dir / "dataset"
        examples = select(pairs, store.iter_feedback() if filters else (), filters,
                          self.cfg.validation_share, latest(store.iter_labels()))
        counts = write_examples(examples, out, "jsonl")
        if counts["train"] < self.cfg.min_pairs or counts["validation"] < 1:
            raise LoopError(f"the export has {counts['train']} train and {counts['validation']} "
                            f"validation examples (needs >= {self.cfg.min_pairs} and >= 1)")

        train, validation = out / "train.jsonl", out / "validation.jsonl"
        topup = self._topup(train, counts["train"])
        return {"dir": str(out), "train": counts["train"] + topup.get("kept", 0),
                "shadow_train": counts["train"], "validation": counts["validation"],
                "topup": topup,
                "sha256": {"train": sha256_file(train), "validation": sha256_file(validation)}}

    def _topup(self, train: Path, have: int) -> dict[str, Any]:
        """Append pool examples the teacher answered (and that pass their checks) to `train`
        until it holds `loop.topup.min_examples`; {} when not configured or not needed."""
        cfg = self.cfg.topup
        if cfg.pool is None or have >= cfg.min_examples:
            return {}
        teacher = self._teacher()
        if teacher is None:
            raise LoopError("loop.topup: no teacher to answer the pool (set loop.teacher)")
        pool = load_suite(self.s.resolve_path(cfg.pool), splits=["train"])
        seen = {json.loads(line)["messages"][-2]["content"]
                for line in train.read_text(encoding="utf-8").splitlines() if line}
        self.say(f"top-up: {have} shadow examples, asking the teacher for up to "
                 f"{cfg.min_examples - have} more from {cfg.pool}")
        got = teacher_examples(teacher, pool, cfg.min_examples - have,
                               cache=self.work / "topup-cache.jsonl", exclude=seen,
                               seed=cfg.seed, progress=self.say)
        with open(train, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in got.pop("examples"))
        return {"pool": cfg.pool, **got}

    def _distill(self, run: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        if self.cfg.recipe is None:
            raise LoopError("loop.recipe: missing (a KD recipe YAML, e.g. examples/loop/recipe.yaml)")
        data = Path(run["stages"]["export"]["dir"])
        recipe = read_yaml_mapping(self.s.resolve_path(self.cfg.recipe))
        recipe["data"] = {**(recipe.get("data") or {}), "train": str(data / "train.jsonl"),
                          "validation": str(data / "validation.jsonl"), "prompts": None}
        recipe["output_dir"] = str(run_dir / "distill")
        resolved = run_dir / "recipe.yaml"
        resolved.write_text(yaml.safe_dump(recipe, sort_keys=False))
        resume = (run_dir / "distill").exists()
        out = run_recipe(resolved, resume=resume)
        manifest = json.loads((out / "manifest.json").read_text())
        return {"dir": str(out), "model": str(out / "model"), "recipe": str(resolved),
                "resumed": resume, "metrics": manifest.get("metrics", {}).get("final", {})}

    def _quantize(self, run: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        out = run_dir / "quantized"
        if out.exists():  # a half-written artifact from a killed attempt
            shutil.rmtree(out)
        prompts, answers = held_out(Path(run["stages"]["export"]["dir"]) / "validation.jsonl")
        report = quantize(run["stages"]["distill"]["model"], self.cfg.quantize, out,
                          prompts=prompts[:QUANTIZE_PROMPTS],
                          teacher_answers=answers[:QUANTIZE_PROMPTS] if answers else None,
                          progress=self.say)
        return {"dir": str(out), "report": report}

    def _validate(self, run: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        if self.cfg.gate is None:
            return {"status": "skipped", "passed": None, "reason": "loop.gate is not set"}

        cfg = load_gate_config(self.s.resolve_path(self.cfg.gate))
        validation = Path(run["stages"]["export"]["dir"]) / "validation.jsonl"
        cfg = cfg.model_copy(update={"heldout": cfg.heldout.model_copy(
            update={"examples": validation, "prompts": None})})
        champion = self._champion()
        report = validate(self._student_entry(run), self._teacher(), cfg,
                          champion=champion["model"] if champion else None,
                          out_dir=run_dir / "gate", progress=self.say,
                          load_settings=self.load_settings)
        return {"passed": report.passed, "failures": report.failures, "champion": champion,
                "report": str(run_dir / "gate" / "gate.json"),
                "fidelity": fidelity_summary(report.checks.get("fidelity"))}

    def _register(self, run: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        registry = self._registry()
        for version in reversed(registry.versions()):  # registered before a crash: reuse
            if registry.manifest(version).get("loop_run") == run["id"]:
                return {"version": version, "reused": True}
        gate = run["stages"]["validate"]
        distilled = json.loads((Path(run["stages"]["distill"]["dir"]) / "manifest.json")
                               .read_text())
        fields = artifact_fields(
            run["stages"]["quantize"]["report"], distill_manifest=distilled,
            gate_report=None if gate.get("passed") is None else json.loads(
                Path(gate["report"]).read_text()), gate_path=gate.get("report"))
        export = run["stages"]["export"]
        promoted = registry.promoted(self._variant()) if self._variant(required=False) else None
        manifest = registry.register(
            run["stages"]["quantize"]["dir"], progress=self.say,
            parent=(promoted or {}).get("version") or registry.latest(),
            **{**fields, "loop_run": run["id"], "teacher": self._teacher_record(run),
               "dataset": {"id": f"loop-{run['id']}", "sha256": export["sha256"],
                           "examples": {"train": export["train"],
                                        "validation": export["validation"]},
                           "until": run["cutoff"], "route": self.cfg.route},
               "code": code_version()})
        return {"version": manifest["version"], "parent": manifest["parent"]}

    def _promote(self, run: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        gate = run["stages"]["validate"]
        if not self.cfg.promote:
            return {"status": "skipped", "reason": "loop.promote is false"}
        if not gate.get("passed"):
            why = "; ".join(gate.get("failures") or []) or gate.get("reason", "no gate")
            return {"status": "skipped", "reason": f"gate not passed: {why}"}
        variant = self._variant()
        record = self._registry().promote(variant, run["stages"]["register"]["version"])
        return {"variant": variant, **record}

    # -- helpers ----------------------------------------------------------------------------

    def _store(self):
        return open_store(self.s.shadow, self.s.base_dir)

    def _registry(self):
        return Registry(self.s.registry_root())

    def _variant(self, required: bool = True) -> str | None:
        if self.cfg.variant is not None:
            return self.cfg.variant
        promotable = [n for n, v in self.s.variants.items() if v.promotable]
        if len(promotable) == 1:
            return promotable[0]
        if required:
            raise LoopError("loop.variant: missing (no single promotable variant to promote "
                            f"into; promotable: {', '.join(promotable) or 'none'})")
        return None

    def _student_entry(self, run: dict[str, Any]) -> str:
        return str(run["stages"]["quantize"]["report"]["output"])

    def _teacher_variant(self) -> tuple[str, Any] | None:
        routes = [self.s.routes[self.cfg.route]] if self.cfg.route else list(self.s.routes.values())
        for route in routes:
            if route.shadow is not None and route.shadow.variant is not None:
                return route.shadow.variant, self.s.variants[route.shadow.variant]
        return None

    def _teacher(self) -> str | None:
        if self.cfg.teacher is not None:
            t = self.cfg.teacher
            return t if t == "fake" or "://" in t else str(self.s.resolve_path(t))
        found = self._teacher_variant()
        return None if found is None else self._model_of(found[1])

    def _champion(self) -> dict[str, Any] | None:
        """What the promotable variant serves now, as the gate's champion: the promoted
        registry version, else the variant's configured model. None without such a variant."""
        name = self._variant(required=False)
        if name is None:
            return None
        registry = self._registry()
        promoted = registry.promoted(name)
        if promoted is not None:
            path = registry.fetch(promoted["version"],
                                  self.s.resolve_path(self.s.registry.cache_dir))
            return {"variant": name, "version": promoted["version"], "model": str(path)}
        variant = self.s.variants[name]
        model = "fake" if variant.engine.engine == "fake" else self._model_of(variant)
        if model is None or (model != "fake" and "://" not in model
                             and not Path(model).exists()):
            raise LoopError(f"variant {name}: its model {model} cannot be found, so there is no "
                            "champion to compare the candidate with")
        return {"variant": name, "version": self.s.variants[name].version, "model": model}

    def _model_of(self, variant: Any) -> str | None:
        """A variant's model as `distill.answers` names it (None for the fake engine)."""
        engine = variant.engine
        if engine.engine == "llamacpp":
            return str(self.s.resolve_path(engine.path))
        if engine.engine in ("transformers", "vllm"):
            return str(self.s.resolve_path(engine.model))
        if engine.engine == "remote":
            return f"{engine.base_url}#{engine.model}"
        return None

    def _teacher_record(self, run: dict[str, Any]) -> dict[str, Any]:
        found = self._teacher_variant()
        teacher = self._teacher()
        record = {"name": found[0] if found else teacher, "models": run["facts"]["teachers"],
                  "version": found[1].version if found else None, "path": teacher}
        if teacher and Path(teacher).is_file():
            record["sha256"] = file_hashes(Path(teacher))[Path(teacher).name]
        elif teacher and Path(teacher).is_dir():
            record["sha256"] = file_hashes(Path(teacher))
        return record

    def _export_metrics(self, state: dict[str, Any]) -> None:
        from prometheus_client import write_to_textfile

        registry = loop_metrics(state)
        self.work.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(self.work / "metrics.prom"), registry)
        if self.cfg.pushgateway:
            from prometheus_client import push_to_gateway

            try:
                push_to_gateway(self.cfg.pushgateway, job="protege-loop", registry=registry)
            except OSError as e:
                log.warning("distill.loop.push_failed", error=str(e))


def loop_metrics(state: dict[str, Any]):
    """The loop's Prometheus metrics from its state's counters (a `CollectorRegistry`)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge

    reg = CollectorRegistry()
    runs = Counter("protege_loop_runs", "Loop runs by outcome.", ("outcome",), registry=reg)
    stages = Counter("protege_loop_stages", "Loop stages by outcome.", ("stage", "outcome"),
                     registry=reg)
    for outcome in OUTCOMES:
        runs.labels(outcome=outcome)
    for key, n in state.get("counters", {}).items():
        name, labels = json.loads(key)
        metric = runs if name == "protege_loop_runs_total" else stages
        metric.labels(**dict(labels)).inc(n)
    last = Gauge("protege_loop_last_run_timestamp_seconds", "When the last run ended.",
                 registry=reg)
    if state.get("last_attempt"):
        last.set(datetime.fromisoformat(state["last_attempt"]["at"]).timestamp())
    return reg


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
