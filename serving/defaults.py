"""Sampling defaults: what a request that omits `temperature` or `top_p` gets, per variant.

    sampling_defaults(variant, resolve_path) -> SamplingDefaults

Each value comes from the first of: the variant's `sampling:` settings; the model's own
generation config, as vLLM reads it (a folder's generation_config.json, a GGUF's
`general.sampling.temp` / `general.sampling.top_p`); OpenAI's 1.0. Reads metadata only, never
weights. `source` says where each value came from; `/v1/models` shows them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPENAI = {"temperature": 1.0, "top_p": 1.0}
LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}  # OpenAI's ranges
GGUF_KEYS = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p"}


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    source: tuple[tuple[str, str], ...] = ()  # (field, "config" | "model" | "openai")

    def card(self) -> dict[str, Any]:
        """As `/v1/models` shows them."""
        return {"temperature": self.temperature, "top_p": self.top_p, "source": dict(self.source)}


def _model_file(engine: Any, resolve_path: Callable[[str], Path]) -> Path | None:
    """The file or folder whose metadata holds the model's generation config."""
    kind = engine.engine
    if kind == "llamacpp":
        return Path(resolve_path(engine.path))
    if kind in ("transformers", "vllm"):
        folder = Path(resolve_path(engine.model))
        gguf_file = getattr(engine, "gguf_file", None)
        return folder / gguf_file if gguf_file else folder
    return None  # fake, remote: no model here


def model_generation_config(path: Path | None) -> dict[str, float]:
    """temperature / top_p from a GGUF's metadata or a folder's generation_config.json."""
    if path is None:
        return {}
    try:
        if path.is_file() and path.suffix == ".gguf":
            from gguf import GGUFReader

            fields = GGUFReader(str(path)).fields
            return {name: float(fields[key].contents()) for name, key in GGUF_KEYS.items()
                    if key in fields}
        config = path / "generation_config.json"
        if path.is_dir() and config.is_file():
            values = json.loads(config.read_text())
            return {k: float(values[k]) for k in OPENAI if isinstance(values.get(k), int | float)}
    except (OSError, ValueError, KeyError):
        return {}  # an unreadable model fails at load time, with its own error
    return {}


def sampling_defaults(variant: Any, resolve_path: Callable[[str], Path]) -> SamplingDefaults:
    """The defaults of one `serving.config.VariantConfig`."""
    model = model_generation_config(_model_file(variant.engine, resolve_path))
    values, source = {}, []
    for name, fallback in OPENAI.items():
        configured = getattr(variant.sampling, name)
        if configured is not None:
            values[name], origin = configured, "config"
        elif name in model:
            low, high = LIMITS[name]
            values[name], origin = min(max(model[name], low), high), "model"
        else:
            values[name], origin = fallback, "openai"
        source.append((name, origin))
    return SamplingDefaults(values["temperature"], values["top_p"], tuple(source))
