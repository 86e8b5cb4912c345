"""What every package's configuration shares: the strict `Section` model, reading a YAML
mapping, quoting a value in an error line, and making a relative path absolute."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A settings section: unknown keys are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


def resolve_path(path: str | Path, base: str | Path) -> Path:
    """`path` with `~` expanded, made absolute against `base` when relative."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else Path(base) / p


def shown(value: Any) -> str:
    """A config value as quoted in an error line (at most 80 characters)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The YAML file at `path` as a mapping (empty: {}); ValueError with a one-line reason."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"{path}: {shown(loaded)} (the top level must be a mapping)")
    return loaded or {}
