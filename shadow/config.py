"""The shadow section of the settings: where pairs go and how much mirroring may cost.

Which routes are mirrored, to what and how often is part of each route (`serving.config`
`RouteConfig.shadow`); this section holds what all routes share. Pure data.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ShadowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store_path: str = Field("data/pairs.sqlite", description="SQLite file of the pairs")
    spill_dir: str = Field("data/spill", description="append-only files while the store is down")
    max_pending: int = Field(32, ge=1, le=100_000,
                             description="mirrors waiting for the shadow worker; more are dropped")
    max_concurrency: int = Field(2, ge=1, le=10_000, description="teacher calls at once")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="a teacher call gives up after this")
    num_cpus: float = Field(0.0, ge=0, le=64, description="Ray CPUs reserved for the worker")
    semantic_model: str | None = Field(
        "models/scorer/all-MiniLM-L6-v2",
        description="sentence embedder for the semantic score; null: no semantic score")
