"""A real Prometheus for tests, and the PromQL that the Grafana dashboards run.

`prometheus(config, tmp)` starts `/usr/bin/prometheus` on 127.0.0.1 (an ephemeral port, a
data dir under `tmp`) with `config` (a dict: the prometheus.yml), waits until it is ready and
stops it on exit; `Prometheus.query(expr)` is `/api/v1/query`'s result list. `dashboard_queries()`
lists every panel expression of `ops/dashboards/*.json`; `promql(expr)` replaces Grafana's
variables so Prometheus itself can run it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from ops.gateway import free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "ops" / "dashboards"
# What Grafana would put in for its built-in variables; a template variable means "all".
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h",
                     "__range_s": "3600"}


def binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}",) if Path(p).exists()),
                                      None)


class Prometheus:
    def __init__(self, base: str, proc: subprocess.Popen, log: Path):
        self.base, self.proc, self.log = base, proc, log

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.base + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr}: {body.get('error', r.text)}")
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single number `expr` gives (None when it gives nothing)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, expected: float, timeout_s: float = 30) -> float:
        seen = []

        def check() -> bool:
            seen.append(self.value(expr))
            return seen[-1] == expected

        wait_until(check, f"{expr} = {expected}", timeout_s, 0.5, lambda: f"last seen {seen[-1]}")
        return expected

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


@contextlib.contextmanager
def prometheus(config: dict, tmp: Path, startup_s: float = 30) -> Iterator[Prometheus]:
    exe = binary("prometheus")
    if exe is None:
        raise RuntimeError("prometheus is not installed: `make prometheus` installs it")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({proc.returncode}):\n{prom.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(prom.base + "/-/ready", timeout=2).status_code == 200
            return False

        wait_until(ready, "prometheus ready", startup_s, 0.2, prom.logs)
        yield prom
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# -- dashboards --------------------------------------------------------------------------------


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(board: dict) -> Iterator[dict]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target."""
    return [(name, panel["title"], target["expr"])
            for name, board in dashboards().items() for panel in panels(board)
            for target in panel.get("targets", []) if target.get("expr")]


def promql(expr: str) -> str:
    """`expr` as Prometheus can run it: Grafana's variables replaced (template ones by `.*`)."""
    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?",
                  lambda m: GRAFANA_VARIABLES.get(m.group(1), ".*"), expr)
