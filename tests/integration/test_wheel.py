"""protege installed as a wheel (not editable), run from a folder outside the checkout: the
CLI checks a config, and a fake-engine gateway serves, with its relative paths taken from the
working directory, never from site-packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ops.gateway import Gateway
from tests import REPO_ROOT

pytestmark = pytest.mark.integration

CONFIG = {
    "variants": {"fake": {"engine": {"engine": "fake", "completion_tokens": 4}, "num_cpus": 0}},
    "routes": {"fake": {"variant": "fake"}},
    "feedback": {"thumbs_up": {"type": "boolean"}},  # a shadow worker, so the store is opened
    "shadow": {"store_path": "data/pairs.sqlite", "num_cpus": 0},
    "server": {"ingress": {"num_cpus": 0}},
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel of this checkout, installed (without its dependencies, which the test's own
    environment has) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for package in ("core", "serving", "shadow", "distill", "ops"):
        shutil.copytree(REPO_ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("protege-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp / "site"), str(wheel)], check=True, timeout=300)
    return tmp / "site"


def run_elsewhere(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=env(site), timeout=120)


def env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}


def test_the_installed_package_is_the_one_that_runs(site, tmp_path):
    out = run_elsewhere(site, tmp_path, "-c", "import json, serving, ops.cli, core; "
                        "print(json.dumps([serving.__file__, core.__file__]))")
    assert out.returncode == 0, out.stderr
    assert all(Path(f).is_relative_to(site) for f in json.loads(out.stdout))
    assert (site / "serving" / "static").is_dir()  # the review page ships in the wheel


def test_config_check_resolves_paths_from_the_working_directory(site, tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = run_elsewhere(site, tmp_path, "-m", "ops.cli", "config", "check", "--config",
                        str(config))
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["shadow"]["store_path"] == "data/pairs.sqlite"


def test_a_fake_gateway_serves_with_its_data_in_the_working_directory(site, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with Gateway(CONFIG, tmp_path / "gw", env={"PYTHONPATH": str(site)}, cwd=work) as gw:
        r = gw.client().chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
        with gw.http() as http:  # feedback is stored at once: the store file now exists
            posted = http.post("/v1/feedback", json={"response_id": r.id, "metric": "thumbs_up",
                                                     "value": True})
        assert posted.status_code == 200, posted.text
        assert (work / "data" / "pairs.sqlite").is_file()
    assert not (site / "data").exists()
