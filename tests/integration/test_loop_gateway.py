"""The whole loop against a running gateway: chats to a tiny GGUF student are shadowed (real Ray
Serve, real store), `protege loop` distills, quantizes, gates, registers and promotes a new
version from those pairs, and the gateway swaps it in while clients keep chatting."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from distill.gguf import convert_to_gguf
from distill.registry import Registry
from ops.gateway import Gateway, wait_until
from shadow.store import SqliteStore
from tests.integration.conftest import REPO
from tests.unit.test_gguf import bpe_tokenizer, save, tiny_model

pytestmark = pytest.mark.integration
LOOSE = {"fidelity.rouge_l": 1.0, "calibration.ece": 1.0, "latency.p95_ttft_s": 60.0}

WORDS = "the quick brown fox jumps over the lazy dog hello world how are you today".split()


def stream_ok(body: str) -> bool:
    """A whole SSE answer: it ends with `data: [DONE]` and none of its events is an error."""
    events = [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]
    if not events or events[-1] != "[DONE]":
        return False
    try:
        return not any("error" in json.loads(event) for event in events[:-1])
    except ValueError:
        return False


def test_pairs_from_live_traffic_become_a_promoted_version(tmp_path):
    tokenizer = bpe_tokenizer()
    student = save(tmp_path / "student0", tiny_model("llama", tokenizer), tokenizer)
    served = convert_to_gguf(student, tmp_path / "student0.gguf", qtype="Q8_0")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "student": {"path": str(student)}, "data": {"max_length": 64}, "strategy": "sequence",
        "optim": {"lr": 1e-3, "max_steps": 2, "batch_size": 4, "warmup_steps": 0},
        "eval_every": 2, "save_every": 2}))
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump({
        "edge_cases": {"enabled": False}, "heldout": {"limit": 3, "max_tokens": 4},
        "fidelity": {"min_rouge_l": 0.0, "semantic_model": None},
        "calibration": {"max_ece": None, "max_overconfident_wrong": None},
        "latency": {"batch_sizes": [1], "concurrency": [1], "rounds": 1, "max_tokens": 4,
                    "max_p95_ttft_s": None},
        "ab": {"enabled": False}, "tasks": {"enabled": False},
        # the champion is compared, but tiny random models never improve significantly:
        # "no worse" is enough here (the gate's own tests cover the paired decision)
        "champion": {"primary": None, "margins": LOOSE}}))
    config = {
        "variants": {
            "tiny": {"engine": {"engine": "llamacpp", "path": str(served), "n_ctx": 256,
                                "n_threads": 1},
                     "version": "base", "num_cpus": 0, "promotable": True},
            "teacher": {"engine": {"engine": "fake", "completion_tokens": 6}, "version": "t1",
                        "num_cpus": 0}},
        "routes": {"tiny": {"variant": "tiny", "shadow": {"variant": "teacher",
                                                           "sample_rate": 1.0}}},
        "shadow": {"store_path": str(tmp_path / "pairs.sqlite"),
                   "spill_dir": str(tmp_path / "spill"), "max_in_flight": 64,
                   "semantic_model": None},
        "registry": {"root": str(tmp_path / "registry"), "poll_s": 0.3},
        "loop": {"work_dir": str(tmp_path / "loop"), "recipe": str(tmp_path / "recipe.yaml"),
                 "gate": str(tmp_path / "gate.yaml"), "teacher": "fake", "route": "tiny",
                 "quantize": "gguf-q8_0", "min_pairs": 20, "validation_share": 0.2},
    }
    gw = Gateway(config, tmp_path, startup_s=300)
    try:
        with httpx.Client(base_url=gw.base, timeout=60) as http:
            for i in range(30):
                r = http.post("/v1/chat/completions", json={
                    "model": "tiny", "max_tokens": 6, "messages": [
                        {"role": "user", "content": " ".join(WORDS[i % 9: i % 9 + 5]) + f" {i}"}]})
                assert r.status_code == 200 and r.headers["x-protege-version"] == "base"
        store = SqliteStore(tmp_path / "pairs.sqlite")
        wait_until(lambda: store.count() >= 30, "30 stored pairs", 60, 0.5)
        assert store.count() == 30

        statuses: list[tuple[int, str]] = []  # (HTTP status or -1: broken stream, version)
        broken: list[str] = []
        stop = threading.Event()

        def chat() -> None:
            with httpx.Client(base_url=gw.base, timeout=60) as http:
                for n in range(5000):  # bounded; stopped long before
                    if stop.is_set():
                        return
                    stream = n % 2 == 0  # the first is a stream
                    r = http.post("/v1/chat/completions", json={
                        "model": "tiny", "max_tokens": 3, "stream": stream,
                        "messages": [{"role": "user", "content": "hello world"}]})
                    ok = r.status_code == 200 and (not stream or stream_ok(r.text))
                    if not ok:
                        broken.append(r.text[-300:])
                    statuses.append((r.status_code if ok else -1,
                                     r.headers.get("x-protege-version", "")))

        client = threading.Thread(target=chat)
        client.start()
        try:
            out = subprocess.run(
                [sys.executable, "-m", "ops.cli", "loop", "--config", str(gw.config_path),
                 "--once"], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
            assert out.returncode == 0, out.stderr[-4000:]
            assert "promoted (v1)" in out.stdout, out.stdout + out.stderr[-3000:]
            wait_until(lambda: statuses and statuses[-1][1] == "v1", "answers from v1", 60, 0.2,
                       lambda: f"last answers {statuses[-5:]}, broken {broken[:3]}")
            time.sleep(1)
        finally:
            stop.set()
            client.join(120)
        assert statuses and all(s == 200 for s, _ in statuses), (statuses[-5:], broken[:3])
        assert statuses[0][1] == "base" and statuses[-1][1] == "v1"

        registry = Registry(tmp_path / "registry")
        manifest = registry.verify("v1")
        examples = manifest["dataset"]["examples"]  # the 30 chats, and the load's one prompt
        assert examples["train"] + examples["validation"] in (30, 31)  # if stored in time
        assert manifest["teacher"]["models"] == ["teacher:t1"]
        assert [s["kind"] for s in registry.lineage("v1")] == ["teacher", "intermediate",
                                                               "student"]
    finally:
        gw.stop()
