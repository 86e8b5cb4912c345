"""Engines behind one interface, and `build_engine` that picks one from its config.

Heavy libraries (llama_cpp, torch/transformers, vllm, httpx) are imported only by the engine
module that needs them, when `build_engine` is called, so importing this package stays cheap.
What conditions a request besides its messages (a `response_format`, tools) is parsed by the
pure helpers re-exported here, so callers outside serving (distill) need nothing else of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from serving.engines.base import (
    AnswerScores,
    Delta,
    Engine,
    EngineError,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    Message,
    PromptTooLong,
    Role,
    SamplingParams,
    StopMatcher,
    TokenLogprob,
    Unsupported,
    merge_deltas,
)
from serving.engines.config import EngineConfig
from serving.engines.fake import FakeEngine
from serving.engines.remote import RemoteEngine
from serving.engines.structured import ResponseFormat, parse_response_format, split_calls
from serving.engines.tools import ToolUse, parse_tools

__all__ = [
    "ResponseFormat",
    "ToolUse",
    "parse_response_format",
    "parse_tools",
    "split_calls",
    "AnswerScores",
    "Delta",
    "Engine",
    "EngineError",
    "EngineInfo",
    "FinishReason",
    "GenerationRequest",
    "Message",
    "PromptTooLong",
    "Role",
    "SamplingParams",
    "StopMatcher",
    "TokenLogprob",
    "Unsupported",
    "build_engine",
    "merge_deltas",
]


def build_engine(config: EngineConfig, resolve_path: Callable[[str], Path]) -> Engine:
    """The engine for `config` (one of `serving.engines.config.EngineConfig`), not yet started.

    `resolve_path` turns a configured path (possibly relative) into a local path; remote and fake
    engines do not use it. Call `await engine.start()` before `generate`.
    """
    kind = config.engine
    if kind == "fake":
        return FakeEngine(config)
    if kind == "remote":
        return RemoteEngine(config)
    # Each heavy engine's library (llama.cpp, torch, vLLM) loads only when a variant uses it.
    if kind == "llamacpp":
        from serving.engines.llamacpp import LlamaCppEngine  # llama_cpp

        return LlamaCppEngine(config, resolve_path)
    if kind == "transformers":
        from serving.engines.transformers import TransformersEngine  # torch, transformers

        return TransformersEngine(config, resolve_path)
    if kind == "vllm":
        from serving.engines.vllm import VllmEngine  # vllm, only where installed

        return VllmEngine(config, resolve_path)
    raise ValueError(
        f"engine: {kind!r} is not an engine (allowed: fake, remote, llamacpp, transformers, vllm)"
    )
