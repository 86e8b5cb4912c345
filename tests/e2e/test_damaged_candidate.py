"""The loop refuses a damaged student: a few steps at a huge learning rate wreck the packaged
SmolLM2, the gate measures it side by side with the champion (the packaged student the gateway
serves) on the task suite, refuses it with the paired reasons, and the gateway keeps serving
the champion."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx
import pytest
import yaml

from distill.registry import Registry
from distill.tasks import load_suite
from ops.gateway import Gateway
from shadow.records import Answer
from shadow.store import SqliteStore
from tests.integration.conftest import REPO
from tests.unit.test_records import make_record

pytestmark = pytest.mark.e2e

STUDENT = REPO / "models" / "student" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_damaged_candidate_is_refused_and_the_champion_keeps_serving(tmp_path):
    if not STUDENT.exists():
        pytest.fail(f"{STUDENT} is missing: run `make models` (make test does it)")
    pool = load_suite(REPO / "examples" / "tasks" / "pool.jsonl")[::40]  # 20 pool prompts
    store = SqliteStore(tmp_path / "pairs.sqlite")
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    store.write_batch([make_record(
        i, route="student", created_at=now, teacher_logprobs=None,
        request={"messages": case.messages},
        student=Answer("student", "packaged", "?", "stop", 40, 1, 5.0, 9.0),
        teacher=Answer("teacher", "t1", case.reference, "stop", 40, 8, 5.0, 9.0),
    ) for i, case in enumerate(pool)])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "student": {"path": str(STUDENT)}, "data": {"max_length": 128},
        "strategy": "sequence",
        "optim": {"lr": 0.05, "max_steps": 4, "batch_size": 4, "warmup_steps": 0},
        "eval_every": 100, "save_every": 100}))  # no checkpoint: 4 steps
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump({
        "n_threads": 1,
        "tasks": {"limit": 4},  # 24 cases of the gate split, 4 a family
        "edge_cases": {"enabled": False}, "heldout": {"limit": 4, "max_tokens": 24},
        "fidelity": {"min_rouge_l": None, "semantic_model": None},
        "calibration": {"enabled": False},
        "latency": {"batch_sizes": [1], "concurrency": [1], "rounds": 2, "max_tokens": 8,
                    "max_p95_ttft_s": None},
        "ab": {"enabled": False}, "champion": {"required": True}}))
    config = {
        "variants": {"student": {
            "engine": {"engine": "llamacpp", "path": str(STUDENT), "n_ctx": 512, "n_threads": 1},
            "version": "packaged", "num_cpus": 0, "promotable": True}},
        "routes": {"student": {"variant": "student"}},
        "registry": {"root": str(tmp_path / "registry"), "poll_s": 0.3},
        "server": {"request_timeout_s": 120},
        "shadow": {"store_path": str(tmp_path / "pairs.sqlite"),
                   "spill_dir": str(tmp_path / "spill")},
        "loop": {"work_dir": str(tmp_path / "loop"), "recipe": str(tmp_path / "recipe.yaml"),
                 "gate": str(tmp_path / "gate.yaml"), "teacher": "fake", "route": "student",
                 "quantize": "gguf-q8_0", "min_pairs": 12, "validation_share": 0.2},
    }
    gw = Gateway(config, tmp_path, startup_s=300)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ops.cli", "loop", "--config", str(gw.config_path),
             "--once", "--force"], cwd=REPO, capture_output=True, text=True, timeout=1200,
            check=False)
        assert out.returncode == 0, out.stderr[-4000:]
        [run_dir] = (tmp_path / "loop" / "runs").iterdir()
        run = json.loads((run_dir / "run.json").read_text())
        assert run["outcome"] == "rejected", run
        gate = run["stages"]["validate"]
        assert gate["champion"] == {"variant": "student", "version": "packaged",
                                    "model": str(STUDENT)}
        report = json.loads((run_dir / "gate" / "gate.json").read_text())
        rows = {r["metric"]: r for r in report["checks"]["champion"]["rows"]}
        main = rows["tasks.pass_rate"]
        assert main["n"] == 24 and main["challenger"] < main["champion"]
        assert main["decision"] == "worse" and not main["passed"]
        assert any(f.startswith("champion: tasks.pass_rate:") and "below the margin" in f
                   for f in gate["failures"])
        assert "keep the champion" in report["checks"]["champion"]["summary"]

        registry = Registry(tmp_path / "registry")
        assert registry.versions() == ["v1"] and registry.manifest("v1")["gate"]["passed"] is False
        assert registry.promoted("student") is None
        time.sleep(1)  # several registry polls
        with httpx.Client(base_url=gw.base, timeout=120) as http:
            for _ in range(3):
                r = http.post("/v1/chat/completions", json={
                    "model": "student", "max_tokens": 8,
                    "messages": [{"role": "user", "content": "Say hello."}]})
                assert r.status_code == 200 and r.headers["x-protege-version"] == "packaged"
    finally:
        gw.stop()
