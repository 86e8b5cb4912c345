"""`protege loop` end to end on a tiny model: real shadow store, real KD recipe, real GGUF
quantization (llama.cpp), real gate, real registry; runs, idles, runs again on new pairs,
rejects a version that fails the gate, resumes after `kill -9` without registering or
promoting twice, and abandons a run whose stage keeps failing. Each test has its own loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime

import pytest
import yaml

from distill.gguf import convert_to_gguf
from distill.loop import Loop
from distill.registry import Registry
from distill.settings import LoopTopup
from ops.gateway import wait_until
from ops.settings import load_settings
from shadow.records import Answer
from shadow.store import SqliteStore
from tests.integration.conftest import REPO
from tests.unit.test_gguf import bpe_tokenizer, save, tiny_model
from tests.unit.test_records import make_record

pytestmark = pytest.mark.integration
LOOSE = {"fidelity.rouge_l": 1.0, "calibration.ece": 1.0, "latency.p95_ttft_s": 60.0}

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "hello", "world", "how", "are", "you", "today"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

# `protege loop ARGS...` whose distill stage writes argv[1] and then blocks until killed.
HOLD_DISTILL = """
import sys, time
from pathlib import Path
from distill.loop import Loop

marker, sys.argv = Path(sys.argv[1]), ["protege", *sys.argv[2:]]

def held(self, run, run_dir):
    marker.touch()
    time.sleep(600)  # bounded: the test kills the process long before
    raise RuntimeError("distill was held for 600 s and nobody killed it")

Loop._distill = held
from ops.cli import app
app()
"""


def add_pairs(store_path, start: int, n: int) -> None:
    store = SqliteStore(store_path)
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    store.write_batch([make_record(
        i, route="student", created_at=now, teacher_logprobs=None,
        request={"messages": [{"role": "user", "content": " ".join(WORDS[i % 7: i % 7 + 4])
                               + f" {i}"}]},
        student=Answer("student", "base", "hello", "stop", 4, 1, 5.0, 9.0),
        teacher=Answer("teacher", "t1", " ".join(WORDS[i % 5: i % 5 + 3]), "stop", 4, 3, 5.0,
                       9.0),
    ) for i in range(start, start + n)])


@pytest.fixture
def env(tmp_path):
    """A fresh loop for one test: a tiny student, 40 pairs, nothing registered or promoted."""
    tokenizer = bpe_tokenizer()
    student = save(tmp_path / "student0", tiny_model("llama", tokenizer), tokenizer)
    served = convert_to_gguf(student, tmp_path / "student0.gguf", qtype="Q8_0")  # the champion
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "student": {"path": str(student)}, "data": {"max_length": 64}, "strategy": "sequence",
        "optim": {"lr": 1e-3, "max_steps": 3, "batch_size": 4, "warmup_steps": 0},
        "eval_every": 3, "save_every": 2}))
    gate = {"edge_cases": {"enabled": False}, "heldout": {"limit": 4, "max_tokens": 6},
            "fidelity": {"min_rouge_l": 0.0, "semantic_model": None},
            "calibration": {"max_ece": None, "max_overconfident_wrong": None},
            "latency": {"batch_sizes": [1], "concurrency": [1], "rounds": 1, "max_tokens": 4,
                        "max_p95_ttft_s": None},
            "ab": {"enabled": False}, "tasks": {"enabled": False},
            # the champion is compared, but tiny random models never improve significantly:
            # "no worse" is enough here (the gate's own tests cover the paired decision)
            "champion": {"primary": None, "margins": LOOSE}}
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump(gate))
    gate["fidelity"]["min_rouge_l"] = 1.0
    (tmp_path / "strict-gate.yaml").write_text(yaml.safe_dump(gate))
    config = {
        "variants": {
            "student": {"engine": {"engine": "llamacpp", "path": str(served)},
                        "promotable": True, "version": "base"},
            "teacher": {"engine": {"engine": "fake"}, "version": "t1"}},
        "routes": {"student": {"variant": "student", "shadow": {"variant": "teacher"}}},
        "shadow": {"store_path": str(tmp_path / "pairs.sqlite"),
                   "spill_dir": str(tmp_path / "spill")},
        "registry": {"root": str(tmp_path / "registry")},
        "loop": {"work_dir": str(tmp_path / "loop"), "recipe": str(tmp_path / "recipe.yaml"),
                 "gate": str(tmp_path / "gate.yaml"), "teacher": "fake", "route": "student",
                 "quantize": "gguf-q8_0", "min_pairs": 12, "validation_share": 0.2,
                 "triggers": {"new_pairs": 10}},
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    add_pairs(tmp_path / "pairs.sqlite", 0, 40)
    return tmp_path


def loop(env, **loop_overrides) -> Loop:
    settings = load_settings(env / "gateway.yaml")
    if loop_overrides:
        settings = settings.model_copy(update={"loop": settings.loop.model_copy(
            update=loop_overrides)})
    return Loop(settings)


def cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "loop", "--config", str(env / "gateway.yaml"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV, check=False)


def runs(env) -> list[dict]:
    found = [json.loads(p.read_text()) for p in (env / "loop" / "runs").glob("*/run.json")]
    return sorted(found, key=lambda run: run["started_at"])


def test_a_run_from_pairs_to_a_promoted_gguf_then_idle_then_again(env):
    run = loop(env).run_once()
    assert run["outcome"] == "promoted", run
    assert [s["status"] for s in run["stages"].values()] == ["done"] * 6
    registry = Registry(env / "registry")
    m = registry.verify("v1")
    assert m["entry"].endswith(".gguf") and m["quantization"]["format"] == "gguf-q8_0"
    assert m["gate"]["passed"] is True and m["loop_run"] == run["id"]
    assert m["dataset"]["examples"]["train"] + m["dataset"]["examples"]["validation"] == 40
    assert m["teacher"]["name"] == "teacher" and m["teacher"]["models"] == ["teacher:t1"]
    assert m["recipe"]["strategy"] == "sequence" and m["fidelity"]["metric"] == "rouge_l"
    kinds = [s["kind"] for s in registry.lineage("v1")]
    assert kinds == ["teacher", "intermediate", "student"]
    assert registry.promoted("student")["version"] == "v1"
    assert run["stages"]["validate"]["champion"] == {
        "variant": "student", "version": "base", "model": str(env / "student0.gguf")}
    gate = json.loads((env / "loop" / "runs" / run["id"] / "gate" / "gate.json").read_text())
    compared = {r["metric"] for r in gate["checks"]["champion"]["rows"]}
    assert compared == {"fidelity.rouge_l", "calibration.ece", "latency.p95_ttft_s"}
    metrics = (env / "loop" / "metrics.prom").read_text()
    assert 'protege_loop_runs_total{outcome="promoted"} 1.0' in metrics
    assert 'protege_loop_stages_total{outcome="done",stage="quantize"} 1.0' in metrics

    assert loop(env).run_once() is None  # nothing new
    add_pairs(env / "pairs.sqlite", 100, 10)
    again = loop(env).run_once()
    assert again["outcome"] == "promoted" and again["reasons"] == ["10 new pairs (>= 10)"]
    assert registry.manifest("v2")["parent"] == "v1"
    champion = again["stages"]["validate"]["champion"]
    assert champion["version"] == "v1" and champion["model"].endswith(".gguf")
    assert registry.promoted("student")["version"] == "v2"


def test_a_thin_shadow_is_topped_up_from_the_pool(env):
    """40 pairs (about 32 to train on) and a pool: the teacher answers pool prompts until the train
    split holds 45, keeping only answers that pass their case's check."""
    words = " ".join(WORDS)
    pool = env / "pool.jsonl"
    pool.write_text("".join(json.dumps({
        "id": f"p{i}", "suite": "t/1", "split": "train", "family": "f",
        "messages": [{"role": "user", "content": f"pool prompt {i} {words}"}],
        # the fake teacher's answer never contains "zebra": odd cases cannot pass
        "check": {"kind": "regex", "pattern": "zebra" if i % 2 else "."}, "reference": "zebra",
        "max_tokens": 32}) + "\n" for i in range(60)))
    run = loop(env, topup=LoopTopup(pool=str(pool), min_examples=45)).run_once(force=True)
    export = run["stages"]["export"]
    added = 45 - export["shadow_train"]
    assert export["train"] == 45 and export["validation"] + export["shadow_train"] == 40
    assert export["topup"]["kept"] == added and export["topup"]["failed_check"] >= 1
    rows = [json.loads(line) for line in
            (env / "loop" / "runs" / run["id"] / "dataset" / "train.jsonl").read_text().splitlines()]
    pooled = [r for r in rows if r.get("source") == "pool"]
    assert len(pooled) == added and all(int(r["id"][6:]) % 2 == 0 for r in pooled)
    assert Registry(env / "registry").manifest("v1")["dataset"]["examples"]["train"] == 45
    asked = export["topup"]["asked"]
    assert len((env / "loop" / "topup-cache.jsonl").read_text().splitlines()) == asked


def test_a_version_that_fails_the_gate_is_registered_with_its_reasons_not_promoted(env):
    run = loop(env, gate=str(env / "strict-gate.yaml")).run_once(force=True)
    assert run["outcome"] == "rejected"
    assert run["stages"]["promote"]["status"] == "skipped"
    assert "fidelity.rouge_l" in run["stages"]["promote"]["reason"]
    version = run["stages"]["register"]["version"]
    registry = Registry(env / "registry")
    manifest = registry.manifest(version)
    assert manifest["gate"]["passed"] is False
    assert any("fidelity.rouge_l" in f and "< 1" in f for f in manifest["gate"]["failures"])
    assert registry.promoted("student") is None and registry.history("student") == []


def test_killed_mid_run_resumes_without_registering_or_promoting_twice(env):
    """The distill stage is held (patched to block) so `kill -9` lands inside it, not by luck;
    the next invocation resumes at distill, and registers and promotes exactly once."""
    registry = Registry(env / "registry")
    marker, log_path = env / "distill-held", env / "held.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_DISTILL, str(marker), "loop", "--config",
             str(env / "gateway.yaml"), "--force"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
    try:
        def tail() -> str:
            return log_path.read_text(errors="replace")[-3000:]

        wait_until(lambda: marker.exists() or proc.poll() is not None, "distill held", 300, 0.2,
                   tail)
        assert proc.poll() is None, tail()
        [held] = runs(env)
        assert held["stages"]["distill"]["status"] == "running" and held["outcome"] is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    killed = runs(env)[0]
    assert killed["attempts"] == 1 and killed["stages"]["distill"]["status"] == "running"
    assert killed["stages"]["export"]["status"] == "done"

    out = cli(env, "--once")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming run {held['id']} (attempt 2)" in out.stderr
    assert f"run {held['id']}: promoted (v1)" in out.stdout, out.stdout + out.stderr[-3000:]
    [run] = runs(env)
    assert run["attempts"] == 2 and run["stages"]["export"] == killed["stages"]["export"]
    assert run["stages"]["distill"]["status"] == "done"
    assert registry.versions() == ["v1"] and registry.manifest("v1")["loop_run"] == run["id"]
    assert [h["version"] for h in registry.history("student")] == ["v1"]

    # A crash between registering and recording it: the run finds its version, promotes once.
    run["stages"]["register"]["status"] = "running"
    del run["stages"]["promote"]
    run["outcome"] = None
    (env / "loop" / "runs" / run["id"] / "run.json").write_text(json.dumps(run))
    resumed = loop(env).run_once()
    assert resumed["outcome"] == "promoted" and resumed["attempts"] == 3
    assert registry.versions() == ["v1"]
    assert [h["version"] for h in registry.history("student")] == ["v1"]
    assert resumed["stages"]["register"].get("reused") is True
    assert resumed["stages"]["register"]["version"] == "v1"


def test_a_failing_stage_is_retried_then_abandoned_and_the_next_trigger_starts_afresh(env):
    """distill fails for real (the recipe's student does not exist): each invocation retries
    the run at distill, the `max_attempts`-th abandons it with nothing registered or promoted,
    and the next invocation starts a new run instead of retrying that one forever."""
    recipe = yaml.safe_load((env / "recipe.yaml").read_text())
    recipe["student"]["path"] = str(env / "no-such-student")
    (env / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    config = yaml.safe_load((env / "gateway.yaml").read_text())
    config["loop"]["max_attempts"] = 3
    (env / "gateway.yaml").write_text(yaml.safe_dump(config))

    exported = None
    for attempt in (1, 2, 3):
        out = cli(env, "--once")
        assert out.returncode == 1, out.stdout + out.stderr[-3000:]
        if attempt < 3:
            assert "the run failed" in out.stderr and "resumes at the failed stage" in out.stderr
        else:
            assert "abandoned after 3 attempts: distill failed" in out.stderr, out.stderr[-3000:]
            assert "the next trigger starts a new run" in out.stderr
        [run] = runs(env)
        assert run["attempts"] == attempt, run
        assert run["stages"]["distill"]["status"] == "failed"
        assert "no-such-student" in run["stages"]["distill"]["error"]
        assert "promote" not in run["stages"] and "quantize" not in run["stages"]
        assert run["outcome"] == (None if attempt < 3 else "abandoned")
        if attempt > 1:
            assert f"resuming run {run['id']} (attempt {attempt})" in out.stderr
            assert run["stages"]["export"] == exported  # retried at the failed stage
        exported = run["stages"]["export"]
    metrics = (env / "loop" / "metrics.prom").read_text()
    assert 'protege_loop_runs_total{outcome="failed"} 2.0' in metrics
    assert 'protege_loop_runs_total{outcome="abandoned"} 1.0' in metrics
    assert 'protege_loop_stages_total{outcome="failed",stage="distill"} 3.0' in metrics
    registry = Registry(env / "registry")
    assert registry.versions() == [] and registry.promoted("student") is None

    out = cli(env, "--once")  # the next trigger: a new run, the abandoned one stays as it was
    assert out.returncode == 1 and "resuming run" not in out.stderr, out.stderr[-3000:]
    abandoned, fresh = runs(env)
    assert abandoned == run
    assert fresh["id"] != run["id"] and fresh["attempts"] == 1 and fresh["outcome"] is None
    assert fresh["stages"]["export"]["status"] == "done"
    assert fresh["stages"]["distill"]["status"] == "failed"
    assert registry.versions() == []
