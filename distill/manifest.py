"""What a registry manifest holds and how it is checked and compared (pure): the paths a
version may name, the `register` fields built from what distill wrote (quantize report, distill
manifest, gate report), diffs between two manifests, and the rows of `protege registry list`.
The registry itself (storage, locks, promotions) is `distill.registry`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class RegistryError(ValueError):
    """A registry operation was refused; the message says why."""


def path_problem(rel: str) -> str | None:
    """Why `rel` cannot name a file inside a version's folder, or None."""
    if not isinstance(rel, str) or not rel:
        return "not a relative path"
    if "\\" in rel or "\x00" in rel:
        return "a backslash or NUL in it"
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "'.', '..' or an empty part in it"
    return None


def entry_problem(entry: Any, files: Iterable[str]) -> str | None:
    """Why `entry` is not what a version may serve: ".", one of its hashed `files`, or a folder
    holding some of them; None when it is."""
    if entry == ".":
        return None
    problem = path_problem(entry)
    if problem:
        return problem
    files = list(files)
    if entry in files or any(f.startswith(entry.rstrip("/") + "/") for f in files):
        return None
    return "not one of the artifact's hashed files"


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """`manifest`, after refusing file keys or an `entry` that could leave the version's folder
    or are not hashed (RegistryError naming the key)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise RegistryError(f"{where}: the manifest has no files")
    for rel in files:
        if problem := path_problem(rel):
            raise RegistryError(f"{where}: file key {rel!r} refused: {problem}")
    if problem := entry_problem(manifest.get("entry"), files):
        raise RegistryError(f"{where}: entry {manifest.get('entry')!r} refused: {problem}")
    return manifest


def diff_manifests(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flattened `key.path -> (a value, b value)` for every leaf that differs (pure)."""
    fa, fb = _flatten(a), _flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys())
            if fa.get(k) != fb.get(k)}


def fidelity_gap(manifest: dict[str, Any]) -> float | None:
    """1 - the student's fidelity score to its teacher (None when the manifest has none)."""
    score = (manifest.get("fidelity") or {}).get("score")
    return None if score is None else round(1.0 - float(score), 6)


def artifact_fields(quantize_report: dict[str, Any], *,
                    distill_manifest: dict[str, Any] | None = None,
                    gate_report: dict[str, Any] | None = None,
                    gate_path: str | None = None) -> dict[str, Any]:
    """`Registry.register` keyword arguments from what distill wrote (pure): the quantize
    report (entry, the file hashes it claims, quantization), the distill run's manifest
    (recipe, teacher, dataset, intermediate models) and the gate report (passed, failures, the
    teacher-student fidelity)."""
    q = quantize_report
    out_dir = Path(q["report"]).parent
    fields: dict[str, Any] = {
        "entry": Path(q["output"]).relative_to(out_dir).as_posix() or ".",
        "expected_files": q["files"],
        "quantization": {k: v for k, v in q.items() if k not in ("files", "source_files")},
    }
    if distill_manifest is not None:
        m = distill_manifest
        fields.update(
            recipe=m.get("config"), distill_metrics=m.get("metrics"),
            intermediates=[{k: v for k, v in step.items() if k != "manifest"}
                           for step in m.get("lineage") or [] if "strategy" in step])
        if m.get("teacher"):
            fields["teacher"] = {"name": m["teacher"]["id"], "sha256": m["teacher"]["sha256"]}
        if m.get("dataset"):
            fields["dataset"] = m["dataset"]
    if gate_report is not None:
        fields["gate"] = {"passed": gate_report["passed"], "failures": gate_report["failures"],
                          "report": gate_path}
        fields["fidelity"] = fidelity_summary((gate_report.get("checks") or {}).get("fidelity"))
    return fields


def fidelity_summary(check: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gate's fidelity numbers; `score` is the semantic similarity when measured, else
    ROUGE-L (the fidelity gap is 1 - score). None when the check did not run."""
    if not check or check.get("status") not in ("passed", "failed"):
        return None
    metric = "semantic" if check.get("semantic") is not None else "rouge_l"
    return {"score": check[metric], "metric": metric,
            **{k: check.get(k) for k in ("rouge_l", "exact_match", "semantic", "pairs")}}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def table(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per manifest for `protege registry list`."""
    out = []
    previous_gap: float | None = None
    for m in rows:
        gap = fidelity_gap(m)
        out.append({
            "version": m["version"], "parent": m.get("parent") or "-",
            "created_at": m.get("created_at", "")[:19],
            "teacher": (m.get("teacher") or {}).get("name") or "-",
            "quantization": (m.get("quantization") or {}).get("format") or "-",
            "size_mb": round(sum_sizes(m) / 1e6, 1),
            "gate": {True: "passed", False: "failed"}.get((m.get("gate") or {}).get("passed"), "-"),
            "fidelity_gap": gap,
            "gap_change": None if gap is None or previous_gap is None else round(gap - previous_gap, 6),
        })
        previous_gap = gap if gap is not None else previous_gap
    return out


def sum_sizes(manifest: dict[str, Any]) -> int:
    return sum(int(v) for v in (manifest.get("sizes") or {}).values())
