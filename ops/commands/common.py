"""What every command shares: the `--config` and `--wait` options, loading settings (exit 2
with one line per bad field) and opening their shadow store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from ops.settings import ConfigError, Settings, load_settings
from shadow.store import open_store

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="YAML settings file; PROTEGE_* env vars override it")
]


def invalid(config: Path, err: ConfigError) -> NoReturn:
    typer.echo(f"invalid config {config}:", err=True)
    for line in str(err).splitlines():
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(2)


def load(config: Path, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as e:
        invalid(config, e)


WaitOption = Annotated[float, typer.Option(
    "--wait", help="seconds to wait for the running gateway to serve it (0: do not wait)")]

def open_store_of(settings: Settings):
    """The settings' shadow store; exit 2 when it cannot be opened as configured."""
    try:
        return open_store(settings.shadow, settings.base_dir)
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
