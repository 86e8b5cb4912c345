"""The one `Settings` object: a YAML file, overridden by `PROTEGE_` environment variables.

Nested keys use `__` (`PROTEGE_SERVER__PORT=9000`); `PROTEGE_API_KEYS=k1,k2` turns on bearer-key
auth. Each package owns its section model (`serving.config`, ...); this module only composes them
and turns validation errors into one line per bad field.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from core.config import Section, read_yaml_mapping, resolve_path, shown
from distill.settings import LoopSettings, RegistrySettings
from serving.config import RouteConfig, ServerConfig, VariantConfig, unknown_route_variants
from shadow.config import FEEDBACK_NAME, FeedbackMetric, ShadowSettings


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_logs: bool = Field(True, description="structlog JSON lines; false: human-readable")
    log_prompts: bool = Field(False, description="include prompt and answer text in logs")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROTEGE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="bearer keys; empty: no auth"
    )
    models_dir: str = Field("models", description="where `protege models fetch` puts models")
    server: ServerConfig = ServerConfig()
    variants: dict[str, VariantConfig] = Field(min_length=1)
    routes: dict[str, RouteConfig] = Field(min_length=1)
    logging: LoggingConfig = LoggingConfig()
    shadow: ShadowSettings = ShadowSettings()
    feedback: dict[str, FeedbackMetric] = Field(
        {}, description="metrics clients may post to /v1/feedback, by name")
    registry: RegistrySettings = RegistrySettings()
    loop: LoopSettings = LoopSettings()
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @model_validator(mode="after")
    def _check_routes(self) -> Settings:
        problems = unknown_route_variants(self.variants, self.routes)
        problems += [f"feedback.{name}: not a metric name (allowed: {FEEDBACK_NAME})"
                     for name in self.feedback if not re.match(FEEDBACK_NAME, name)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword overrides (command-line flags) beat the environment, which beats the file.
        return (init_settings, env_settings, _FileSource(settings_cls))

    @property
    def base_dir(self) -> Path:
        """What relative paths in these settings are relative to: the working directory when
        they were loaded (the Ray replicas get it from the process that loaded them)."""
        return self._base_dir

    def resolve_path(self, path: str) -> Path:
        """A config path made absolute (relative paths: from `base_dir`)."""
        return resolve_path(path, self._base_dir)

    def registry_root(self) -> str:
        """`registry.root` as every process must see it: an fsspec URL, or an absolute path."""
        root = self.registry.root
        return root if "://" in root else str(self.resolve_path(root))


_file_data: ContextVar[dict[str, Any]] = ContextVar("protege_settings_file", default={})


class _FileSource(PydanticBaseSettingsSource):
    """The parsed YAML file that `load_settings` is reading."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _file_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_data.get())


class ConfigError(ValueError):
    """The configuration is invalid; `str()` is one line per bad field."""


def format_validation_error(err: ValidationError) -> str:
    """One line per bad field: `path: value (what is allowed)`."""
    lines = []
    for e in err.errors(include_url=False):
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"{path}: missing (required)")
        elif not e["loc"] and e["type"] == "value_error":
            lines.extend(msg.split("; "))
        else:
            lines.append(f"{path}: {shown(e.get('input'))} ({msg})")
    return "\n".join(lines)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read `path` (YAML), apply env overrides, then `overrides`; raise `ConfigError` if invalid."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = read_yaml_mapping(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        token = _file_data.set(data)
        try:
            settings = Settings(**overrides)
        finally:
            _file_data.reset(token)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    return settings

