"""`protege loop` end to end on a tiny model: real shadow store, real KD recipe, real GGUF
quantization (llama.cpp), real gate, real registry; runs, idles, runs again on new pairs,
rejects a version that fails the gate, and resumes after `kill -9` without registering or
promoting twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import yaml

from distill.loop import Loop
from distill.registry import Registry
from ops.settings import load_settings
from shadow.records import Answer
from shadow.store import SqliteStore
from tests.integration.conftest import REPO
from tests.unit.test_gguf import bpe_tokenizer, save, tiny_model
from tests.unit.test_records import make_record

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "hello", "world", "how", "are", "you", "today"]


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


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    tokenizer = bpe_tokenizer()
    student = save(tmp / "student0", tiny_model("llama", tokenizer), tokenizer)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump({
        "student": {"path": str(student)}, "data": {"max_length": 64}, "strategy": "sequence",
        "optim": {"lr": 1e-3, "max_steps": 3, "batch_size": 4, "warmup_steps": 0},
        "eval_every": 3, "save_every": 2}))
    gate = {"edge_cases": {"enabled": False}, "heldout": {"limit": 4, "max_tokens": 6},
            "fidelity": {"min_rouge_l": 0.0, "semantic_model": None},
            "calibration": {"max_ece": None, "max_overconfident_wrong": None},
            "latency": {"batch_sizes": [1], "concurrency": [1], "rounds": 1, "max_tokens": 4,
                        "max_p95_ttft_s": None},
            "ab": {"enabled": False}}
    (tmp / "gate.yaml").write_text(yaml.safe_dump(gate))
    gate["fidelity"]["min_rouge_l"] = 1.0
    (tmp / "strict-gate.yaml").write_text(yaml.safe_dump(gate))
    config = {
        "variants": {
            "student": {"engine": {"engine": "llamacpp", "path": str(tmp / "unused.gguf")},
                        "promotable": True, "version": "base"},
            "teacher": {"engine": {"engine": "fake"}, "version": "t1"}},
        "routes": {"student": {"variant": "student", "shadow": {"variant": "teacher"}}},
        "shadow": {"store_path": str(tmp / "pairs.sqlite"), "spill_dir": str(tmp / "spill")},
        "registry": {"root": str(tmp / "registry")},
        "loop": {"work_dir": str(tmp / "loop"), "recipe": str(tmp / "recipe.yaml"),
                 "gate": str(tmp / "gate.yaml"), "teacher": "fake", "route": "student",
                 "quantize": "gguf-q8_0", "min_pairs": 12, "validation_share": 0.2,
                 "triggers": {"new_pairs": 10}},
    }
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    add_pairs(tmp / "pairs.sqlite", 0, 40)
    return tmp


def loop(env, **loop_overrides) -> Loop:
    settings = load_settings(env / "gateway.yaml")
    if loop_overrides:
        settings = settings.model_copy(update={"loop": settings.loop.model_copy(
            update=loop_overrides)})
    return Loop(settings)


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
    metrics = (env / "loop" / "metrics.prom").read_text()
    assert 'protege_loop_runs_total{outcome="promoted"} 1.0' in metrics
    assert 'protege_loop_stages_total{outcome="done",stage="quantize"} 1.0' in metrics

    assert loop(env).run_once() is None  # nothing new
    add_pairs(env / "pairs.sqlite", 100, 10)
    again = loop(env).run_once()
    assert again["outcome"] == "promoted" and again["reasons"] == ["10 new pairs (>= 10)"]
    assert registry.manifest("v2")["parent"] == "v1"
    assert registry.promoted("student")["version"] == "v2"


def test_a_version_that_fails_the_gate_is_registered_with_its_reasons_not_promoted(env):
    before = Registry(env / "registry").promoted("student")["version"]
    run = loop(env, gate=str(env / "strict-gate.yaml")).run_once(force=True)
    assert run["outcome"] == "rejected"
    assert run["stages"]["promote"]["status"] == "skipped"
    assert "fidelity.rouge_l" in run["stages"]["promote"]["reason"]
    version = run["stages"]["register"]["version"]
    manifest = Registry(env / "registry").manifest(version)
    assert manifest["gate"]["passed"] is False
    assert any("fidelity.rouge_l" in f and "< 1" in f for f in manifest["gate"]["failures"])
    assert Registry(env / "registry").promoted("student")["version"] == before


def test_killed_mid_run_resumes_without_registering_or_promoting_twice(env):
    registry = Registry(env / "registry")
    versions, history = registry.versions(), registry.history("student")
    cmd = [sys.executable, "-m", "ops.cli", "loop", "--config", str(env / "gateway.yaml")]
    proc = subprocess.Popen([*cmd, "--force"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    run_json = None
    while time.monotonic() < deadline and proc.poll() is None:  # kill -9 inside "distill"
        runs = sorted((env / "loop" / "runs").glob("*/run.json"))
        if runs:
            run = json.loads(runs[-1].read_text())
            if run["outcome"] is None and run["stages"].get("distill", {}).get("status") == (
                    "running"):
                run_json = runs[-1]
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait(30)
    assert run_json is not None, proc.stdout.read().decode()[-3000:]
    exported = json.loads(run_json.read_text())["stages"]["export"]

    out = subprocess.run([*cmd, "--once"], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming run" in out.stderr and ": promoted (v" in out.stdout
    run = json.loads(run_json.read_text())
    assert run["attempts"] == 2 and run["stages"]["export"] == exported  # not redone
    assert len(registry.versions()) == len(versions) + 1
    assert len(registry.history("student")) == len(history) + 1

    # A crash between registering and recording it: the run finds its version, promotes once.
    run["stages"]["register"]["status"] = "running"
    del run["stages"]["promote"]
    run["outcome"] = None
    run_json.write_text(json.dumps(run))
    resumed = loop(env).run_once()
    assert resumed["stages"]["register"]["reused"] is True
    assert len(registry.versions()) == len(versions) + 1
    assert len(registry.history("student")) == len(history) + 1
