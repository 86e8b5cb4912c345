"""Real gateways for integration tests: `protege serve` in a subprocess on 127.0.0.1.

Like vLLM's `RemoteOpenAIServer`: pick a free port, start the real CLI, poll `/health`, fail fast
if the process dies, hand back clients; SIGTERM on teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


class Gateway:
    """A running `protege serve`, stopped with SIGTERM."""

    def __init__(self, config: dict, tmp: Path, env: dict[str, str] | None = None,
                 startup_s: float = 180):
        self.port = free_port()
        config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1",
                                       "port": self.port}}
        self.config_path = tmp / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "gateway.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve", "--config", str(self.config_path)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env=_env(env),
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self._wait_ready(startup_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    # /health answers as soon as the ingress is up; wait for the app too.
                    if "serving on http" in self.logs():
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"gateway not ready in {timeout_s}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=API_KEY, max_retries=0, **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=API_KEY, max_retries=0,
                                  **kw)

    def http(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}", **kw.pop("headers", {})}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30, **kw)

    def stop(self, timeout_s: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


FAKE_CONFIG = {
    "server": {
        "max_body_bytes": 64 * 1024,
        "request_timeout_s": 4,
        "drain_timeout_s": 20,
        "ingress": {"replicas": 2, "num_cpus": 0},
    },
    "logging": {"level": "info"},
    "variants": {
        "fake": {"engine": {"engine": "fake", "completion_tokens": 12, "context_window": 256},
                 "version": "f1", "num_cpus": 0},
        "counted": {"engine": {"engine": "fake", "completion_tokens": 5}, "num_cpus": 0,
                    "replicas": 2, "version": "c1"},
        "slow": {"engine": {"engine": "fake", "completion_tokens": 2000, "token_delay_s": 0.05},
                 "num_cpus": 0},
        "narrow": {"engine": {"engine": "fake", "completion_tokens": 30, "token_delay_s": 0.1,
                              "max_concurrency": 1},
                   "num_cpus": 0, "max_ongoing_requests": 1, "max_queued_requests": 1},
        "hang": {"engine": {"engine": "fake", "ttft_s": 60}, "num_cpus": 0},
        "paced": {"engine": {"engine": "fake", "completion_tokens": 40, "token_delay_s": 0.01},
                  "num_cpus": 0, "stream_interval_s": 0.1},
        "greedy": {"engine": {"engine": "fake", "completion_tokens": 12},
                   "sampling": {"temperature": 0}, "num_cpus": 0},
    },
    "routes": {
        "fake": {"variant": "fake"},
        "counted": {"variant": "counted"},
        "slow": {"variant": "slow"},
        "narrow": {"variant": "narrow"},
        "hang": {"variant": "hang"},
        "paced": {"variant": "paced"},
        "greedy": {"variant": "greedy"},
    },
}


@pytest.fixture(scope="session")
def gateway(tmp_path_factory) -> Gateway:
    gw = Gateway(FAKE_CONFIG, tmp_path_factory.mktemp("gw"), env={"PROTEGE_API_KEYS": API_KEY})
    yield gw
    gw.stop()


# -- reading /metrics ----------------------------------------------------------------------


def sample(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def scrape(gateway, name, **labels) -> float:
    return sample(httpx.get(gateway.base + "/metrics").text, name, **labels)


def settled(gateway, keys) -> dict:
    """Values once every replica has pushed what earlier tests did (pushes come each second)."""
    values = None
    for _ in range(20):
        now = {k: scrape(gateway, k[0], **dict(k[1])) for k in keys}
        if now == values:
            return now
        values = now
        time.sleep(2.5)
    raise AssertionError(f"metrics never settled: {values}")


def wait_for_metric(gateway, name, expected, timeout_s=20, **labels) -> float:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = sample(httpx.get(gateway.base + "/metrics").text, name, **labels)
        if value == expected:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{name}{labels} = {value}, expected {expected}")
