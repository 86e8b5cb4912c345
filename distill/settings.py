"""The distillation sections of the gateway's one `Settings`: where the registry lives.

`registry.root` is a local folder (relative paths from the repo root) or any fsspec URL
(``s3://bucket/protege``); variants marked `promotable` poll it every `poll_s` seconds for the
version `protege promote` chose for them, copying remote artifacts into `cache_dir` first.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RegistrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field("data/registry", description="local folder or fsspec URL of the registry")
    poll_s: float = Field(2.0, gt=0, le=3600, description="how often promotable variants check "
                          "for a new promotion")
    cache_dir: str = Field("data/registry-cache", description="local copies of artifacts "
                           "from a remote registry")
