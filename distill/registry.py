"""The model registry: versioned student artifacts with their lineage, and which version each
promotable variant serves.

Owns the layout under a root that is a local folder or any fsspec URL (``s3://bucket/registry``):

    versions/vN/manifest.json      written last: a version exists once its manifest does
    versions/vN/.claimed           an object store's claim of the number (written first)
    versions/vN/files/...          the artifact (a .gguf file, or a model folder)
    promotions/<variant>.json      {"current": {...}, "history": [...]}: what the gateway serves
    <name>.lock                    held while a promotion or manifest is read-modified-written

A manifest records version, parent, teacher (name, version, file hash), dataset (id, hash),
recipe config, quantization, gate report, teacher-student fidelity, created_at, code version and
the sha256 of every file. `register` refuses files that do not match the hashes the artifact
claims; `verify` and `fetch` refuse stored files that no longer match the manifest. A manifest
whose file keys or `entry` could leave the version's folder (`..`, an absolute path, a
backslash) or whose `entry` is not among its hashed files is refused when read; `fetch` checks
a copy in a folder of its own and moves it into the cache only once it matches. Promotions and
manifest updates are read-modified-written under a lock: `flock` on a local registry; on an object
store a lock object created only if absent (a conditional put) that names its owner and expires
after `LOCK_LEASE_S`, so a writer that died does not block the others for good. What a manifest
may hold, and the pure reads of it, are `distill.manifest`'s. Does not own how artifacts are made
(distill, quantize, gate) or how a gateway swaps models (serving). (Over 400 lines: the
storage, its two kinds of lock and the promotions they guard belong together.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.hashing import sha256_stream
from distill.manifest import RegistryError, check_manifest, entry_problem, fidelity_gap

VERSION = re.compile(r"^v([1-9][0-9]*)$")
MANIFEST = "manifest.json"
CLAIMED = ".claimed"  # an object-store version's claim, written before its files
LOCK_LEASE_S = 60.0  # an object-store lock older than this was left by a writer that died
LOCK_WAIT_S = 120.0  # how long a writer waits for a lock another one holds


def sha256_bytes_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    with fs.open(path, "rb") as f:
        return sha256_stream(f)


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of a file (keyed by its name) or of every file under a folder (relative paths)."""
    local = LocalFileSystem()
    if path.is_file():
        return {path.name: sha256_bytes_of(local, str(path))}
    if not path.is_dir():
        raise RegistryError(f"{path}: no such file or folder")
    return {p.relative_to(path).as_posix(): sha256_bytes_of(local, str(p))
            for p in sorted(path.rglob("*")) if p.is_file()}


def version_number(version: str) -> int:
    m = VERSION.match(version)
    if m is None:
        raise RegistryError(f"{version!r} is not a version (v1, v2, ...)")
    return int(m.group(1))


class Registry:
    """Versions and promotions under `root` (a local path or an fsspec URL)."""

    def __init__(self, root: str | Path, **storage_options: Any):
        self.root = str(root)
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    # -- versions ---------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Registered versions, oldest first."""
        base = self._p("versions")
        if not self.fs.exists(base):
            return []
        names = [PurePosixPath(p).name for p in self.fs.ls(base, detail=False)]
        found = [n for n in names if VERSION.match(n) and self.fs.exists(self._p("versions", n, MANIFEST))]
        return sorted(found, key=version_number)

    def manifest(self, version: str) -> dict[str, Any]:
        version_number(version)
        path = self._p("versions", version, MANIFEST)
        if not self.fs.exists(path):
            known = ", ".join(self.versions()) or "none"
            raise RegistryError(f"{version}: not in the registry at {self.root} (versions: {known})")
        return check_manifest(json.loads(self.fs.cat_file(path)), f"{self.root} {version}")

    def latest(self) -> str | None:
        found = self.versions()
        return found[-1] if found else None

    def register(self, source: str | Path, *, entry: str | None = None,
                 expected_files: dict[str, str] | None = None, parent: str | None = None,
                 progress: Callable[[str], None] | None = None, **fields: Any) -> dict[str, Any]:
        """Copy the artifact at `source` (a file or folder) in as the next version.

        `expected_files` are the hashes the artifact claims (its own manifest's); any file that
        does not match, or is missing, refuses the registration. `entry` is what a gateway
        serves, relative to the artifact (default: the file itself, or the folder). Other
        keyword fields (teacher, dataset, recipe, quantization, gate, fidelity, lineage, ...)
        go into the manifest as given.
        """
        src = Path(source)
        hashes = file_hashes(src)
        if expected_files is not None:
            bad = _mismatches(expected_files, hashes)
            if bad:
                raise RegistryError(f"{src}: files do not match the artifact's manifest: "
                                    + "; ".join(bad))
        if parent is not None:
            self.manifest(parent)
        entry = entry if entry is not None else (src.name if src.is_file() else ".")
        if problem := entry_problem(entry, hashes):
            raise RegistryError(f"{src}: entry {entry!r} refused: {problem}")
        version = self._claim_version()
        files_dir = self._p("versions", version, "files")
        for rel in hashes:
            if progress:
                progress(f"copying {rel} into {version}")
            target = f"{files_dir}/{rel}"
            self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
            self.fs.put_file(str(src / rel) if src.is_dir() else str(src), target)
        stored = {rel: sha256_bytes_of(self.fs, f"{files_dir}/{rel}") for rel in hashes}
        bad = _mismatches(hashes, stored)
        if bad:
            raise RegistryError(f"{version}: the copy does not match the source: " + "; ".join(bad))
        manifest = {
            "version": version, "parent": parent, "created_at": datetime.now(UTC).isoformat(),
            "entry": entry, "files": hashes,
            "sizes": {rel: (src / rel if src.is_dir() else src).stat().st_size for rel in hashes},
            **fields,
        }
        self._write_json(self._p("versions", version, MANIFEST), manifest)
        return manifest

    def verify(self, version: str) -> dict[str, Any]:
        """The manifest, after checking every stored file against it (RegistryError if not)."""
        manifest = self.manifest(version)
        files_dir = self._p("versions", version, "files")
        stored = {}
        for rel in manifest["files"]:
            path = f"{files_dir}/{rel}"
            if self.fs.exists(path):
                stored[rel] = sha256_bytes_of(self.fs, path)
        bad = _mismatches(manifest["files"], stored)
        if bad:
            raise RegistryError(f"{version}: stored files do not match the manifest: "
                                + "; ".join(bad))
        return manifest

    def fetch(self, version: str, cache_dir: str | Path) -> Path:
        """A local path to the version's entry, checked against its manifest: in place for a
        local registry, else copied under `cache_dir/<version>/` (reused when already there)."""
        manifest = self.manifest(version)
        if self.local:
            self.verify(version)
            return Path(self._p("versions", version, "files")) / manifest["entry"]
        local = Path(cache_dir) / version
        have = file_hashes(local) if local.is_dir() else {}
        if _mismatches(manifest["files"], have):
            self.verify(version)
            local.parent.mkdir(parents=True, exist_ok=True)
            aside = local.parent / f".{version}.fetching-{uuid.uuid4().hex[:8]}"
            try:
                for rel in manifest["files"]:  # keys checked by `manifest`: they stay inside
                    (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(self._p("versions", version, "files", rel), str(aside / rel))
                bad = _mismatches(manifest["files"], file_hashes(aside))
                if bad:
                    raise RegistryError(f"{version}: the fetched copy does not match: "
                                        + "; ".join(bad))
                if local.exists():
                    shutil.rmtree(local)
                aside.replace(local)  # checked, then into place
            finally:
                shutil.rmtree(aside, ignore_errors=True)
        return local / manifest["entry"]

    def update(self, version: str, **fields: Any) -> dict[str, Any]:
        """Add fields to a version's manifest (e.g. the gate report after validation); the
        files and their hashes cannot be changed this way."""
        if {"files", "version", "entry"} & fields.keys():
            raise RegistryError("files, version and entry are fixed once registered")
        self.manifest(version)  # a version that exists, before anything is written for it
        with self._locked(f"versions/{version}/manifest"):
            manifest = {**self.manifest(version), **fields}
            self._write_json(self._p("versions", version, MANIFEST), manifest)
        return manifest

    def lineage(self, version: str) -> list[dict[str, Any]]:
        """teacher -> intermediate models -> registered ancestors -> this version, in order."""
        chain: list[dict[str, Any]] = []
        seen: set[str] = set()
        v: str | None = version
        while v is not None and v not in seen:
            seen.add(v)
            chain.append(self.manifest(v))
            v = chain[-1].get("parent")
        chain.reverse()
        steps: list[dict[str, Any]] = []
        root = chain[0]
        if root.get("teacher"):
            steps.append({"kind": "teacher", **root["teacher"]})
        for m in chain:
            for step in m.get("intermediates") or []:
                steps.append({"kind": "intermediate", **step})
            steps.append({"kind": "student", "version": m["version"],
                          "teacher": (m.get("teacher") or {}).get("name"),
                          "quantization": (m.get("quantization") or {}).get("format"),
                          "gate": (m.get("gate") or {}).get("passed"),
                          "fidelity_gap": fidelity_gap(m)})
        return steps

    # -- promotions -------------------------------------------------------------------------

    def promoted(self, variant: str) -> dict[str, Any] | None:
        """What `variant` should serve: {"version", "entry", "promoted_at", ...}, or None."""
        state = self._promotions(variant)
        return state["current"] if state else None

    def promote(self, variant: str, version: str, *, force: bool = False,
                action: str = "promote") -> dict[str, Any]:
        """Make `variant` serve `version`. Only versions whose gate passed, unless `force`.
        Promoting the version already current changes nothing."""
        manifest = self.verify(version)
        gate = manifest.get("gate") or {}
        if not gate.get("passed") and not force:
            why = "; ".join(gate.get("failures") or []) or "it has no gate report"
            raise RegistryError(f"{version} did not pass the validation gate ({why}); "
                                "use --force to promote it anyway")
        with self._locked(f"promotions/{variant}"):
            return self._promote(variant, version, manifest, force, action)

    def _promote(self, variant: str, version: str, manifest: dict[str, Any], force: bool,
                 action: str) -> dict[str, Any]:
        gate = manifest.get("gate") or {}
        state = self._promotions(variant) or {"variant": variant, "current": None, "history": []}
        current = state["current"]
        if current is not None and current["version"] == version:
            return current
        record = {"version": version, "entry": manifest["entry"], "action": action,
                  "forced": bool(force and not gate.get("passed")),
                  "previous": current["version"] if current else None,
                  "promoted_at": datetime.now(UTC).isoformat()}
        state["current"] = record
        state["history"].append(record)
        self.fs.makedirs(self._p("promotions"), exist_ok=True)
        self._write_json(self._p("promotions", f"{variant}.json"), state)
        return record

    def rollback(self, variant: str) -> dict[str, Any]:
        """Serve the version that was current before the current one (gate not re-checked)."""
        state = self._promotions(variant)
        if not state or not state["current"] or not state["current"].get("previous"):
            raise RegistryError(f"{variant}: nothing to roll back to")
        return self.promote(variant, state["current"]["previous"], force=True, action="rollback")

    def history(self, variant: str) -> list[dict[str, Any]]:
        state = self._promotions(variant)
        return state["history"] if state else []

    # -- internals --------------------------------------------------------------------------

    def _write_json(self, path: str, data: dict[str, Any]) -> None:
        """Whole or not at all: a replica polling the file never reads half of it (a local
        file is written aside and renamed; an object store's put is already atomic)."""
        text = json.dumps(data, indent=2, default=str).encode()
        if not self.local:
            self.fs.pipe_file(path, text)
            return
        tmp = Path(f"{path}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(text)
        tmp.replace(path)

    @contextlib.contextmanager
    def _locked(self, name: str):
        """Hold the exclusive lock `<name>.lock` for a read-modify-write of `name`."""
        path = self._p(f"{name}.lock")
        if not self.local:
            with self._leased(path):
                yield
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _leased(self, path: str):
        """An object store's lock: an object created only if absent, naming its owner and
        when its lease ends. A lease past its end is taken over (its writer died); the lock is
        removed on exit only while it is still this writer's."""
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            lease = json.dumps({"owner": owner, "until": time.time() + LOCK_LEASE_S}).encode()
            try:
                self.fs.pipe_file(path, lease, mode="create")
                break
            except FileExistsError:
                held = _read_lease(self.fs, path)
                if held is not None and held.get("until", 0) < time.time() \
                        and self._take_over(path, held):
                    continue
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"{self.root}: {path} has been locked by another writer for over "
                        f"{LOCK_WAIT_S:.0f} s; remove it if no promotion is running") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            # A lock that cannot be removed is left behind: it ends with its lease.
            with contextlib.suppress(Exception):
                if (_read_lease(self.fs, path) or {}).get("owner") == owner:
                    self.fs.rm_file(path)

    def _take_over(self, path: str, held: dict[str, Any]) -> bool:
        """Remove the lock at `path` whose lease ended (its writer died); False when another
        waiter is doing so. Only the waiter whose conditional put of `<lock>.dead-<owner>`
        succeeds removes it, and only while it still names that owner, so two waiters never
        remove a lock a third has just taken."""
        dead = re.sub(r"[^0-9A-Za-z]", "", str(held.get("owner")))[:64] or "unreadable"
        marker = f"{path}.dead-{dead}"
        try:
            self.fs.pipe_file(marker, b"", mode="create")
        except FileExistsError:
            return False
        try:
            if (_read_lease(self.fs, path) or {}).get("owner") == held.get("owner"):
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(marker)
        return True

    def _p(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def _promotions(self, variant: str) -> dict[str, Any] | None:
        path = self._p("promotions", f"{variant}.json")
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def _claim_version(self) -> str:
        """The next free version, claimed exclusively so two writers never get the same
        number: its folder is created (a local registry), or a `.claimed` marker is written
        only if absent (an object store's conditional put, fsspec's `mode="create"`)."""
        base = self._p("versions")
        self.fs.makedirs(base, exist_ok=True)
        taken = [PurePosixPath(p).name for p in self.fs.ls(base, detail=False)]
        n = max([version_number(t) for t in taken if VERSION.match(t)] or [0]) + 1
        while True:
            path = self._p("versions", f"v{n}")
            try:
                if self.local:
                    Path(path).mkdir()
                else:
                    self.fs.pipe_file(f"{path}/{CLAIMED}", b"", mode="create")
                return f"v{n}"
            except FileExistsError:
                n += 1


class RegistryPromotions:
    """The registry as a gateway's variants see it (`serving.variant.PromotionSource`): what is
    promoted for a variant, fetched into `cache_dir`. It holds only its settings, so it pickles
    to each replica; the `Registry` opens on first use in the replica's process."""

    def __init__(self, root: str, cache_dir: str, poll_s: float):
        self.root, self.cache_dir, self.poll_s = root, cache_dir, poll_s
        self._registry: Registry | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_registry": None}

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.root)
        return self._registry

    def promoted(self, variant: str) -> dict[str, Any] | None:
        return self.registry.promoted(variant)

    def fetch(self, version: str) -> Path:
        return self.registry.fetch(version, self.cache_dir)

    def fidelity_gap(self, version: str) -> float | None:
        return fidelity_gap(self.registry.manifest(version))


def _read_lease(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """A lock object's content; None when it is gone, {} (expired) when it is unreadable."""
    try:
        held = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def _mismatches(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    return [f"{rel}: {'missing' if rel not in actual else 'sha256 differs'}"
            for rel, digest in sorted(expected.items()) if actual.get(rel) != digest]
