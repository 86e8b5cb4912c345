"""Promotion with zero failed requests: a running gateway (real Ray Serve, two llama.cpp replicas
of the packaged student) swaps registry versions while clients keep sending chats."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from core.metrics import sample_total as sample
from distill.registry import Registry
from ops.gateway import Gateway, wait_until
from tests.integration.conftest import REPO

pytestmark = pytest.mark.e2e

STUDENT = REPO / "models" / "student" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not STUDENT.exists():
        pytest.fail(f"{STUDENT} is missing: run `make models` (make test does it)")
    tmp = tmp_path_factory.mktemp("promote")
    registry = Registry(tmp / "registry")
    for i in (1, 2):
        folder = tmp / f"artifact{i}"
        folder.mkdir()
        shutil.copy(STUDENT, folder / f"student-{i}.gguf")
        registry.register(folder, entry=f"student-{i}.gguf", teacher={"name": "smollm2"},
                          gate={"passed": True, "failures": []}, fidelity={"score": 0.5 + i / 10})
    config = {
        "variants": {"student": {
            "engine": {"engine": "llamacpp", "path": str(STUDENT), "n_ctx": 512, "n_threads": 1},
            "version": "base", "replicas": 2, "num_cpus": 0, "promotable": True,
            "max_queued_requests": -1}},
        "routes": {"student": {"variant": "student"}},
        "registry": {"root": str(tmp / "registry"), "poll_s": 0.3},
        "server": {"request_timeout_s": 120},
        "shadow": {"store_path": str(tmp / "pairs.sqlite"), "spill_dir": str(tmp / "spill")},
    }
    gw = Gateway(config, tmp, startup_s=300)
    yield gw, registry
    gw.stop()


def cli(gw, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args, "--config",
                           str(gw.config_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)


class Load:
    """Clients sending chats back to back (stream and not) until stopped; every outcome kept
    with the times its request started (before the POST) and ended."""

    def __init__(self, gw, clients: int = 3):
        self.gw, self.stop_at = gw, threading.Event()
        # started, ended, status, version, body
        self.results: list[tuple[float, float, int, str, str]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.gw.base, timeout=120) as http:
            n = 0
            while not self.stop_at.is_set() and n < 10000:  # bounded
                n += 1
                body = {"model": "student", "max_tokens": 4, "temperature": 0,
                        "stream": bool((i + n) % 2),
                        "messages": [{"role": "user", "content": f"Count to {n}."}]}
                started = time.monotonic()
                r = http.post("/v1/chat/completions", json=body)
                ok = r.status_code == 200 and (not body["stream"] or "data: [DONE]" in r.text)
                self.results.append((started, time.monotonic(), r.status_code if ok else -1,
                                     r.headers.get("x-protege-version", ""), r.text[:300]))

    def wait_for(self, after: float, n: int = 5, timeout_s: float = 120) -> None:
        """Until `n` requests that started after `after` have ended."""
        wait_until(lambda: sum(r[0] > after for r in list(self.results)) >= n,
                   f"{n} requests ended", timeout_s, 0.1,
                   lambda: f"last results {list(self.results)[-3:]}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_at.set()
        for t in self.threads:
            t.join(300)


def test_promote_and_roll_back_under_load_fail_no_request(setup):
    gw, registry = setup
    began = time.monotonic()
    with Load(gw) as load:
        load.wait_for(began)
        first_issued = time.monotonic()
        windows: list[list] = []  # [CLI returned, next step issued, version the step serves]
        for args, version in ((["promote", "v1"], "v1"), (["promote", "v2"], "v2"),
                              (["rollback"], "v1")):
            if windows:
                windows[-1][1] = time.monotonic()
            out = cli(gw, *args, "--wait", "120")
            assert out.returncode == 0, out.stderr + gw.logs()
            windows.append([time.monotonic(), float("inf"), version])
            load.wait_for(windows[-1][0])
    results = list(load.results)
    failed = [r for r in results if r[2] != 200]
    assert len(results) > 30 and not failed, failed[:3]
    assert {"base", "v1", "v2"} <= {v for _, _, _, v, _ in results}
    before = [v for _, ended, _, v, _ in results if ended < first_issued]
    assert before and set(before) == {"base"}, before
    # once the CLI says every replica serves it, every request sent until the next step says so
    for returned, issued, version in windows:
        window = [v for started, _, _, v, _ in results if returned < started < issued]
        assert len(window) >= 5 and set(window) == {version}, (version, window)

    metrics = httpx.get(gw.base + "/metrics").text
    assert sample(metrics, "protege_engine_replica_up", variant="student", version="v1") == 2
    assert sample(metrics, "protege_engine_replica_up", variant="student", version="v2") == 0
    assert sample(metrics, "protege_engine_generations_total", variant="student", version="v2",
                  outcome="completed") > 0
    # v1's manifest says fidelity 0.6: the gauge is per variant, not summed over the 2 replicas
    assert sample(metrics, "protege_student_fidelity_gap", variant="student") == pytest.approx(0.4)
    assert "serving.variant.promoted" in gw.log_path.read_text()
    assert registry.promoted("student")["version"] == "v1"


def test_a_restarted_gateway_serves_the_promoted_version(setup, tmp_path):
    gw, registry = setup
    config = yaml.safe_load(gw.config_path.read_text())
    config["variants"]["student"]["replicas"] = 1
    fresh = Gateway(config, tmp_path, startup_s=300)
    try:
        r = httpx.post(fresh.base + "/v1/chat/completions", timeout=60, json={
            "model": "student", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.headers["x-protege-version"] == "v1"
        assert r.json()["system_fingerprint"] == "student:v1"
    finally:
        fresh.stop()
