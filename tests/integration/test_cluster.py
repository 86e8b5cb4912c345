"""`protege serve` joins an existing Ray cluster when RAY_ADDRESS is set, and leaves it running."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from ops.gateway import Gateway, free_port, gateway_env
from tests.integration.conftest import FAKE_CONFIG, REPO

pytestmark = pytest.mark.integration

# A stand-in for an existing cluster: a Ray head started by another process.
HEAD = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False,
         object_store_memory=200 * 1024 * 1024, namespace="cluster-owner")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""

PROBE = """
import sys, ray
from ray import serve
ray.init(address=sys.argv[1], namespace="probe")
print("nodes", len([n for n in ray.nodes() if n["Alive"]]))
print("apps", sorted(serve.status().applications))
"""


CONFIG = {**FAKE_CONFIG,
          "server": {**FAKE_CONFIG["server"], "ingress": {"replicas": 1, "num_cpus": 0}},
          "variants": {"fake": FAKE_CONFIG["variants"]["fake"]},
          "routes": {"fake": {"variant": "fake"}}}


@pytest.fixture
def cluster():
    """(address, auth env) of a running Ray head; its token, as an operator hands it over."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **auth})
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        yield address, auth
    finally:
        head.stdin.close()
        head.wait(60)


def run_script(script: str, address: str, auth: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, address], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, **auth},
                          check=False)


def test_serve_joins_existing_cluster_and_leaves_it_running(tmp_path, cluster):
    address, auth = cluster
    gw = Gateway(CONFIG, tmp_path, env={"RAY_ADDRESS": address, **auth})
    try:
        r = gw.client().chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
        assert f"Connecting to existing Ray cluster at address: {address}" in gw.logs()
    finally:
        assert gw.stop() == 0, gw.logs()
    probe = run_script(PROBE, address, auth)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "nodes 1" in probe.stdout  # the cluster is still up
    assert "'protege'" not in probe.stdout  # but our application is gone


DELETE_APP = """
import sys, ray
from ray import serve
ray.init(address=sys.argv[1], namespace="probe")
serve.delete("protege")
print("deleted")
"""


def test_on_a_shared_cluster_a_second_gateway_refuses_and_a_lost_app_stops_the_first(
        tmp_path, cluster):
    address, auth = cluster
    first = Gateway(CONFIG, tmp_path, env={"RAY_ADDRESS": address, **auth})
    try:
        (tmp_path / "second").mkdir()
        second = tmp_path / "second" / "gateway.yaml"
        second.write_text(first.config_path.read_text().replace(str(first.port),
                                                                str(free_port())))
        refused = subprocess.run(
            [sys.executable, "-m", "ops.cli", "serve", "--config", str(second)], cwd=REPO,
            capture_output=True, text=True, timeout=180, check=False,
            env={**gateway_env({"RAY_ADDRESS": address}), **auth})
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert "already runs an application named 'protege'" in refused.stderr
        msg = [{"role": "user", "content": "hi"}]
        assert first.client().chat.completions.create(model="fake", messages=msg)

        deleted = run_script(DELETE_APP, address, auth)
        assert "deleted" in deleted.stdout, deleted.stderr[-3000:]
        assert first.proc.wait(60) == 1, first.logs()  # it exits instead of serving 404s
        assert "is no longer deployed" in first.logs()
    finally:
        first.stop()
