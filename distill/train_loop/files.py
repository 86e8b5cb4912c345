"""What a run writes and reads back: seeds and RNG state, checkpoints, weight hashes, the code
version, the saved model, final metrics and the loss curve."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.hashing import sha256_file


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoints(root: Path) -> list[Path]:
    """`root/step-N` folders, oldest first."""
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(root: Path, step: int, module: nn.Module, optimizer, scheduler,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    """Weights, optimizer, scheduler, step, RNG states and `extra` into `root/step-N` (written
    under a temporary name, then renamed); only the newest `keep` are kept."""
    from safetensors.torch import save_model

    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(module, str(tmp / "model.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra},
               tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, module: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote; returns its state dict (step, extra)."""
    from safetensors.torch import load_model

    load_model(module, str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", weights_only=False)  # our own file: RNG states
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def weight_hashes(path: Path) -> dict[str, str]:
    """sha256 of a weights file, or of every weights file in a model folder."""
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = [p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".bin", ".gguf")]
    return {p.name: sha256_file(p) for p in files}


def code_version() -> dict[str, str | None]:
    """protege's installed version and the git commit of this checkout (None outside git)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("protege")
    except PackageNotFoundError:
        installed = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10,
                                check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"protege_version": installed, "git_commit": commit}


def save_hf_model(model, tokenizer, out: Path) -> None:
    """A plain Hugging Face folder: safetensors weights, config, generation config, tokenizer."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def final_metrics(history: dict[str, list[dict]]) -> dict[str, Any]:
    """Mean train loss over the first and last tenth of the steps, and the last validation."""
    train = history["train"]
    tenth = max(1, len(train) // 10)
    first, last = train[:tenth], train[-tenth:]
    return {"train_loss_first": sum(h["loss"] for h in first) / max(len(first), 1),
            "train_loss_last": sum(h["loss"] for h in last) / max(len(last), 1),
            **{k: v for k, v in (history["eval"] or [{}])[-1].items() if k != "step"}}


def plot_loss_curve(history: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history["train"]]
    ax.plot(steps, [h["loss"] for h in history["train"]], label="train loss", lw=1)
    evals = [h for h in history["eval"] if h.get("val_loss") is not None]
    if evals:
        ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-",
                label="validation CE")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
