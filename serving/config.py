"""The serving section of the settings: model variants, routes, the HTTP server.

A *variant* is one deployed model (an engine plus its Ray resources). A *route* is the name a
client puts in `model`; it points at a primary variant, or splits its traffic between weighted A/B
*arms* (each arm one variant); its engine is a `serving.engines.config` section. Pure data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from core.config import Section
from serving.engines.config import EngineConfig, RemoteEngine

NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


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

    in_ingress: bool = Field(
        False, description="serve this variant inside each ingress replica, one process hop "
        "fewer a request; for engines that hold no model (remote, fake). `replicas`, `num_cpus` "
        "and `nice` then do not apply; `max_ongoing_requests` and `max_queued_requests` hold "
        "per ingress replica")

    @model_validator(mode="after")
    def _promotable_engine(self) -> VariantConfig:
        if self.promotable and self.engine.engine not in ("llamacpp", "transformers", "vllm"):
            raise ValueError(f"promotable: a {self.engine.engine} engine has no model to swap "
                             "(allowed with llamacpp, transformers, vllm)")
        if self.in_ingress and self.engine.engine not in ("remote", "fake"):
            raise ValueError(f"in_ingress: a {self.engine.engine} engine computes in its own "
                             "replica, not in the ingress's (allowed with remote, fake)")
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
