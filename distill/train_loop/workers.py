"""Running the recipe's worker in Ray Train workers (`TorchTrainer`, CPU, gloo)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.raylocal import start_local_ray
from distill.config import RecipeError


def fit_with_ray(worker: Callable[[dict], None], loop_config: dict[str, Any], *, workers: int,
                 storage: Path) -> None:
    """`worker(loop_config)` in `workers` Ray Train workers: `TorchTrainer`, CPU, gloo.

    Starts a Ray of its own (`core.raylocal`; shut down after) unless one is running or
    RAY_ADDRESS names one. A `RecipeError` raised in a worker is raised here as it was.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    started = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if started:
        start_local_ray(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False)
    try:
        TorchTrainer(worker, train_loop_config=loop_config,
                     scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(name="kd", storage_path=str(storage))).fit()
    except TrainingFailedError as e:
        for error in getattr(e, "worker_failures", {}).values():
            if isinstance(error, RecipeError):
                raise RecipeError(str(error)) from None
        raise
    finally:
        if started:
            ray.shutdown()
