"""A gateway started from code, the way a user starts one: `protege serve` in a process of its
own on a free 127.0.0.1 port. `Gateway` waits until it serves, hands out OpenAI and HTTP
clients, reads its metrics and stops it (SIGTERM, then SIGKILL). Tests, benchmarks and the
examples use it; `free_port` and `wait_until` are the helpers it is made of.

    with Gateway({"variants": ..., "routes": ...}, Path("work")) as gw:
        gw.client().chat.completions.create(model="student", messages=[...])
        gw.metric("protege_requests_total", route="student")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import yaml

from core.metrics import sample_total

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], T], what: str, timeout_s: float = 30,
               interval_s: float = 0.2, detail: Callable[[], str] = lambda: "") -> T:
    """`check()`'s first truthy value, polled every `interval_s`; AssertionError naming `what`
    (and `detail()`, e.g. a log tail) when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if value := check():
            return value
        if time.monotonic() >= deadline:
            more = detail()
            raise AssertionError(f"no {what} within {timeout_s:g} s" + (f":\n{more}" if more
                                                                        else ""))
        time.sleep(interval_s)


def gateway_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child gateway: its own Ray (no RAY_ADDRESS), no model
    downloads, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


class Gateway:
    """A running `protege serve` on `config` (a settings mapping; host and port are set here),
    its settings file and log in `workdir`, run in `cwd` (what relative paths in `config` are
    relative to; default: this process's working directory). `api_key` is what the clients send
    (default: the first of `PROTEGE_API_KEYS` in `env`)."""

    def __init__(self, config: dict, workdir: Path, env: dict[str, str] | None = None,
                 startup_s: float = 180, api_key: str | None = None, cwd: Path | None = None):
        self.port = free_port()
        config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1",
                                       "port": self.port}}
        keys = (env or {}).get("PROTEGE_API_KEYS", "")
        self.api_key = api_key or keys.split(",")[0].strip() or "none"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "gateway.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "serve", "--config", str(self.config_path)],
            cwd=cwd or Path.cwd(), stdout=self._log, stderr=subprocess.STDOUT, env=gateway_env(env),
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_until(self._ready, "gateway serving", startup_s, 0.5, self.logs)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited ({self.proc.returncode}):\n{self.logs()}")
        try:
            up = httpx.get(self.base + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
        return up and "serving on http" in self.logs()  # /health answers before the app is up

    def logs(self) -> str:
        """The last 20,000 characters the gateway printed."""
        return self.log_path.read_text(errors="replace")[-20000:]

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.api_key, max_retries=0,
                             **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=self.api_key,
                                  max_retries=0, **kw)

    def http(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}", **kw.pop("headers", {})}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30, **kw)

    def metrics(self) -> str:
        """The /metrics page."""
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.get(self.base + "/metrics", headers=headers, timeout=10).text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples `name` whose labels include `labels`."""
        return sample_total(self.metrics(), name, **labels)

    def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM (the gateway drains), SIGKILL to its process group after `timeout_s`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
