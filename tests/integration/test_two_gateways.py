"""Two `protege serve` processes on one machine, started and stopped in overlapping order: each
owns its Ray instance, so stopping one never takes the other's replicas down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest

from ops.gateway import Gateway

pytestmark = pytest.mark.integration

CHAT = {"model": "chat", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


def config(version: str) -> dict:
    return {
        "server": {"ingress": {"replicas": 1, "num_cpus": 0}},
        "variants": {"fake": {"engine": {"engine": "fake", "completion_tokens": 3},
                              "version": version, "num_cpus": 0}},
        "routes": {"chat": {"variant": "fake"}},
        "shadow": {"store_path": "unused.sqlite"},
    }


def answered_by(gw: Gateway, requests: int = 20) -> set[str]:
    """The versions that answered `requests` chats; fails on any status but 200."""
    versions = set()
    with httpx.Client(base_url=gw.base, timeout=30) as http:
        for _ in range(requests):
            r = http.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, (r.status_code, r.text, gw.logs()[-3000:])
            versions.add(r.headers["x-protege-version"])
    return versions


def ray_of(gw: Gateway) -> str:
    """The GCS address of the Ray instance the gateway said it serves from."""
    for line in gw.log_path.read_text(errors="replace").splitlines():
        if '"serving.app.started"' in line:
            event = json.loads(line[line.index("{"):])
            assert event["own_ray"] is True, event
            return event["ray"]
    raise AssertionError(f"no serving.app.started line:\n{gw.logs()[-3000:]}")


JOIN = """
import sys, ray
try:
    ray.init(address=sys.argv[1])
except Exception as e:
    print("refused:", type(e).__name__)
else:
    print("joined")
"""


def assert_refuses_clients_without_its_token(address: str) -> None:
    """A gateway's own Ray listens on every interface: without the run's token, no way in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", JOIN, address], capture_output=True, text=True,
                         timeout=180, env=env, check=False)
    assert "refused:" in out.stdout and "joined" not in out.stdout, out.stdout + out.stderr[-2000:]
    assert "Authentication token is missing or incorrect" in out.stderr, out.stderr[-2000:]


def start_in_background(version: str, tmp) -> tuple[threading.Thread, list]:
    started: list = []  # the Gateway, or the error that stopped it starting

    def run():
        try:
            started.append(Gateway(config(version), tmp))
        except Exception as e:  # noqa: BLE001 - handed to the test
            started.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, started


def test_overlapping_gateways_never_share_or_stop_each_other(tmp_path_factory):
    first = Gateway(config("one"), tmp_path_factory.mktemp("one"))
    second = third = None
    try:
        assert answered_by(first) == {"one"}
        assert_refuses_clients_without_its_token(ray_of(first))
        # The second starts while the first is being stopped (SIGTERM and its drain).
        thread, started = start_in_background("two", tmp_path_factory.mktemp("two"))
        assert first.stop() == 0, first.logs()
        thread.join(300)
        second = started[0]
        assert not isinstance(second, Exception), second
        assert answered_by(second, 40) == {"two"}
        # A third starts while the second serves; then the second stops under it.
        third = Gateway(config("three"), tmp_path_factory.mktemp("three"))
        assert answered_by(second) == {"two"} and answered_by(third) == {"three"}
        assert second.stop() == 0, second.logs()
        assert answered_by(third, 40) == {"three"}
        assert third.proc.poll() is None  # still serving
        rays = [ray_of(gw) for gw in (first, second, third)]
        assert len(set(rays)) == 3, rays  # each had a Ray instance of its own
    finally:
        for gw in (first, second, third):
            if gw is not None:
                gw.stop()
