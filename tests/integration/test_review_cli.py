"""`protege review`: the review page on its own port, without Ray, on a real store."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import httpx
import pytest
import yaml

from ops.gateway import free_port, wait_until
from shadow.store import SqliteStore
from tests.integration.conftest import REPO
from tests.integration.test_review import seeded

pytestmark = pytest.mark.integration


def test_review_command_serves_the_page_and_the_api(tmp_path):
    seeded(SqliteStore(tmp_path / "pairs.sqlite"))
    config = yaml.safe_load((REPO / "examples" / "fake.yaml").read_text())
    config["shadow"] = {"store_path": str(tmp_path / "pairs.sqlite"),
                        "spill_dir": str(tmp_path / "spill")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "PROTEGE_API_KEYS": "k1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "review", "--config", str(tmp_path / "config.yaml"),
         "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(base + "/review", timeout=2).status_code == 401
            return False

        wait_until(up, "protege review serving", 60, 0.5)
        assert httpx.get(base + "/", follow_redirects=False).headers["location"] == "/review"
        api = httpx.Client(base_url=base, headers={"Authorization": "Bearer k1"}, timeout=10)
        assert api.get("/review/api/pairs").json()["total"] == 12
        pair_id = api.get("/review/api/pairs?size=1").json()["items"][0]["pair_id"]
        assert api.post(f"/review/api/pairs/{pair_id}/label",
                        json={"verdict": "teacher", "reviewer": "ana"}).status_code == 201
        assert api.get("/review/api/summary").json()["labelled"] == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert f"review page on http://127.0.0.1:{port}/review" in out
