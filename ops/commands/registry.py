"""`protege registry ...`, `protege promote` and `protege rollback`: registered versions, and
which one a promotable variant serves (with `--wait`, until the running gateway serves it)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from core.metrics import sample_total
from distill.manifest import artifact_fields, diff_manifests
from distill.manifest import table as registry_table
from distill.registry import Registry, RegistryError
from ops.commands.common import ConfigOption, WaitOption, load
from ops.settings import Settings

registry_app = typer.Typer(help="Registered student versions and their lineage.",
                           no_args_is_help=True)


def _registry(settings: Settings):
    return Registry(settings.registry_root())


def _registry_call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RegistryError as e:
        typer.echo(f"{what}: {e}", err=True)
        raise typer.Exit(2) from None


@registry_app.command("list")
def registry_list(config: ConfigOption,
                  as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every version: parent, teacher, quantization, size, gate, fidelity gap to the teacher."""


    reg = _registry(load(config))
    rows = registry_table(reg.manifest(v) for v in reg.versions())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no versions in {reg.root}")
        return
    cols = list(rows[0])
    cells = [[("-" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


@registry_app.command("add")
def registry_add(
    artifact: Annotated[Path, typer.Argument(help="a `protege quantize` output folder")],
    config: ConfigOption,
    gate: Annotated[Path | None, typer.Option(help="its `protege validate` gate.json")] = None,
    parent: Annotated[str | None, typer.Option(help="the version it descends from")] = None,
) -> None:
    """Register a quantized student by hand (the loop registers its own): its files are
    checked against quantize.json; the distill run's manifest and the gate report, when found,
    fill in teacher, dataset, recipe, lineage and fidelity."""


    def read(path: Path, what: str) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            typer.echo(f"registry add: cannot read {what} {path}: {e}", err=True)
            raise typer.Exit(2) from None

    report = read(artifact / "quantize.json", "the quantize report")
    distilled = Path(report["source"]).parent / "manifest.json"
    fields = artifact_fields(
        report, distill_manifest=read(distilled, "the distill manifest") if distilled.exists()
        else None, gate_report=read(gate, "the gate report") if gate else None,
        gate_path=str(gate) if gate else None)
    reg = _registry(load(config))
    manifest = _registry_call("registry add", reg.register, artifact, parent=parent, **fields)
    typer.echo(f"registered {manifest['version']} ({len(manifest['files'])} files) in {reg.root}")


@registry_app.command("show")
def registry_show(version: str, config: ConfigOption) -> None:
    """A version's manifest (JSON)."""

    reg = _registry(load(config))
    typer.echo(json.dumps(_registry_call("registry show", reg.manifest, version), indent=2))


@registry_app.command("lineage")
def registry_lineage(version: str, config: ConfigOption) -> None:
    """teacher -> intermediate models -> earlier versions -> this version."""
    reg = _registry(load(config))
    for i, step in enumerate(_registry_call("registry lineage", reg.lineage, version)):
        kind = step.pop("kind")
        key = "version" if kind == "student" else "name" if "name" in step else "model"
        name = step.pop(key, "?")
        if isinstance(step.get("sha256"), dict):  # a model folder: one hash per file
            step["sha256"] = f"{len(step['sha256'])} files"
        detail = ", ".join(f"{k}={str(v)[:12] if k == 'sha256' else v}"
                           for k, v in step.items() if v is not None)
        typer.echo(f"{'   ' * i}{'└─ ' if i else ''}{kind} {name}" + (f" ({detail})" if detail else ""))


@registry_app.command("diff")
def registry_diff(a: str, b: str, config: ConfigOption) -> None:
    """What differs between two versions' manifests (recipe, data, quantization, gate, ...)."""
    reg = _registry(load(config))
    ma = _registry_call("registry diff", reg.manifest, a)
    mb = _registry_call("registry diff", reg.manifest, b)
    changed = diff_manifests(ma, mb)
    for key, (x, y) in changed.items():
        if key.startswith(("files.", "sizes.")) or key in ("version", "created_at"):
            continue
        typer.echo(f"{key}: {x!r} -> {y!r}")


def _promoted_variant(settings: Settings, variant: str | None) -> str:
    promotable = [n for n, v in settings.variants.items() if v.promotable]
    if variant is not None:
        if variant not in promotable:
            typer.echo(f"--variant {variant}: not a promotable variant (promotable: "
                       f"{', '.join(promotable) or 'none; set promotable: true on one'})", err=True)
            raise typer.Exit(2)
        return variant
    if len(promotable) != 1:
        typer.echo("name the variant with --variant (promotable: "
                   f"{', '.join(promotable) or 'none; set promotable: true on one'})", err=True)
        raise typer.Exit(2)
    return promotable[0]


def _wait_served(settings: Settings, variant: str, version: str, timeout_s: float) -> None:
    """Poll the gateway's /metrics until every replica of `variant` serves `version`."""
    host = settings.server.host if settings.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{settings.server.port}/metrics"
    headers = ({"authorization": f"Bearer {settings.api_keys[0]}"}
               if settings.api_keys and settings.server.metrics_require_key else {})
    want = settings.variants[variant].replicas
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url, headers=headers, timeout=5).text
            up = sample_total(text, "protege_engine_replica_up", variant=variant, version=version)
            if up >= want:
                typer.echo(f"{variant} serves {version} on {url.rsplit('/', 1)[0]}")
                return
        except (httpx.HTTPError, ValueError):  # not up yet, or not a metrics page
            pass
        time.sleep(0.5)
    typer.echo(f"the gateway at {url} did not serve {version} within {timeout_s:g} s", err=True)
    raise typer.Exit(1)


def promote(
    version: str,
    config: ConfigOption,
    variant: Annotated[str | None, typer.Option(help="the promotable variant")] = None,
    force: Annotated[bool, typer.Option(help="promote a version that did not pass the gate")] = False,
    wait: WaitOption = 0,
) -> None:
    """Serve a registered version: the running gateway swaps it in without a failed request."""
    settings = load(config)
    name = _promoted_variant(settings, variant)
    record = _registry_call("promote", _registry(settings).promote, name, version, force=force)
    typer.echo(f"promoted {record['version']} for {name}"
               + (f" (was {record['previous']})" if record.get("previous") else "")
               + (" [forced past the gate]" if record.get("forced") else ""))
    if wait:
        _wait_served(settings, name, version, wait)


def rollback(
    config: ConfigOption,
    variant: Annotated[str | None, typer.Option(help="the promotable variant")] = None,
    wait: WaitOption = 0,
) -> None:
    """Serve the version that was promoted before the current one."""
    settings = load(config)
    name = _promoted_variant(settings, variant)
    record = _registry_call("rollback", _registry(settings).rollback, name)
    typer.echo(f"rolled {name} back to {record['version']} (from {record['previous']})")
    if wait:
        _wait_served(settings, name, record["version"], wait)
