"""The KD recipe's parts, kept out of `distill.recipes.kd` so that the recipe reads top to bottom.

Owns: the per-step maths (`step_loss`, `top1_agreement`: pure, tensors in, tensors out), the
student module that DDP wraps (`StudentModule`: the model plus layer-wise projections),
batching (`Batches`: length-bucketed or packed, reshuffled per epoch, sharded by rank),
turning stored top-k logprobs into tensors (`align_topk`), tokenizer comparison,
teacher/student generation, and the files a run writes (checkpoints, manifest pieces, the loss
curve). Does not own the loss functions (`distill.losses`), tokenisation (`distill.data`) or the
order of a run (the recipe).

Alignment: `labels` are unshifted (`distill.data`); the logits at position i predict token i+1,
so every loss here compares ``logits[:, :-1]`` with ``labels[:, 1:]`` (and ``topk_*[:, 1:]``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.hashing import sha256_file
from core.raylocal import start_local_ray
from distill.config import LossConfig, RecipeError, TeacherAnswers
from distill.data import IGNORE, pack
from distill.losses import distillation_loss, hidden_state_loss, token_mask, topk_kl

# --- step maths ----------------------------------------------------------------------------------


class StepLosses(NamedTuple):
    total: Tensor  # what is backpropagated
    soft: Tensor  # the teacher term (0 for sequence)
    hard: Tensor  # cross-entropy on the labels
    hidden: Tensor  # the hidden-state term (layerwise; else 0)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over tokens whose label is not -100 (0 when there are none). Aligned inputs."""
    mask = token_mask(labels)
    per_token = F.cross_entropy(logits[mask].float(), labels[mask], reduction="none")
    return per_token.sum() / max(per_token.numel(), 1)


def step_loss(strategy: str, student_logits: Tensor, batch: dict[str, Tensor], cfg: LossConfig, *,
              teacher_logits: Tensor | None = None, rollout: bool = False,
              student_hidden: list[Tensor] | None = None, teacher_hidden: list[Tensor] | None = None,
              layer_map: dict[int, int] | None = None, hidden_kind: str = "mse",
              hidden_weight: float = 0.0) -> StepLosses:
    """The loss of one micro-batch. Logits ``[B, L, V]`` unshifted, as the model returns them.

    sequence: CE on the teacher's answer. topk: ``alpha * topk_kl + (1 - alpha) * CE`` against the
    stored top-k. logit / on_policy / layerwise: ``distillation_loss`` (``alpha`` soft + hard);
    on a student rollout (`rollout`) only the soft term, as the labels are the student's own.
    layerwise adds ``hidden_weight * hidden_state_loss`` over the (already projected) states.
    """
    labels = batch["labels"][:, 1:]
    s = student_logits[:, :-1]
    zero = s.new_zeros((), dtype=torch.float32)
    if strategy == "sequence":
        hard = cross_entropy(s, labels)
        return StepLosses(hard, zero, hard, zero)
    if strategy == "topk":
        soft = topk_kl(s, batch["topk_ids"][:, 1:], batch["topk_logprobs"][:, 1:],
                       temperature=cfg.temperature, mask=token_mask(labels))
        hard = cross_entropy(s, labels)
        return StepLosses(cfg.alpha * soft + (1 - cfg.alpha) * hard, soft, hard, zero)
    s, t = same_vocab(s, teacher_logits[:, :-1])
    total, soft, hard = distillation_loss(s, t, labels, alpha=1.0 if rollout else cfg.alpha,
                                          temperature=cfg.temperature, kind=cfg.kind,
                                          beta=cfg.beta)
    hidden = zero
    if strategy == "layerwise":
        hidden = hidden_state_loss(student_hidden, teacher_hidden, layer_map, kind=hidden_kind,
                                   mask=batch["attention_mask"].bool())
        total = total + hidden_weight * hidden
    return StepLosses(total, soft, hard, hidden)


def same_vocab(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Cut both ``[..., V]`` to the smaller vocabulary (a model may pad its embedding matrix)."""
    v = min(student.shape[-1], teacher.shape[-1])
    return student[..., :v], teacher[..., :v]


def teacher_top1(batch: dict[str, Tensor], teacher_logits: Tensor | None) -> Tensor | None:
    """``[B, L-1]`` the teacher's most likely next token (-1: unknown), from logits or top-k."""
    if teacher_logits is not None:
        return teacher_logits[:, :-1].argmax(-1)
    if "topk_ids" in batch:
        ids, lps = batch["topk_ids"][:, 1:], batch["topk_logprobs"][:, 1:]
        return ids.gather(-1, lps.argmax(-1, keepdim=True)).squeeze(-1)
    return None


def top1_agreement(student_logits: Tensor, top1: Tensor, labels: Tensor) -> tuple[int, int]:
    """(agreeing tokens, counted tokens) over answer tokens where the teacher's top-1 is known."""
    mask = token_mask(labels[:, 1:]) & (top1 >= 0)
    agree = (student_logits[:, :-1].argmax(-1) == top1) & mask
    return int(agree.sum()), int(mask.sum())


def coin(seed: int, index: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, index): the same on every rank and on resume."""
    return random.Random(seed * 1_000_003 + index).random()


# --- the student module --------------------------------------------------------------------------


class StudentModule(nn.Module):
    """The student and its layer-wise projections as one module, so DDP syncs both.

    `forward(batch, hidden=True)` also returns the hidden states, projected to the teacher's
    width at the layers that have a projection (keys: student hidden-state index).
    """

    def __init__(self, model: nn.Module, projections: nn.ModuleDict | None = None):
        super().__init__()
        self.model = model
        self.projections = projections if projections is not None else nn.ModuleDict()

    def forward(self, batch: dict[str, Tensor], hidden: bool = False):
        out = self.model(**model_inputs(batch), output_hidden_states=hidden)
        if not hidden:
            return out.logits, None
        states = list(out.hidden_states)
        for layer, proj in self.projections.items():
            states[int(layer)] = proj(states[int(layer)])
        return out.logits, states


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def projections_for(layer_map: dict[int, int], student_width: int,
                    teacher_width: int) -> nn.ModuleDict:
    """A learned ``Linear(D_s, D_t)`` per mapped student layer when the widths differ."""
    if student_width == teacher_width:
        return nn.ModuleDict()
    return nn.ModuleDict({str(s): nn.Linear(student_width, teacher_width, bias=False)
                          for s in layer_map})


def default_layer_map(keep_layers: list[int], teacher_layers: int) -> dict[int, int]:
    """Kept layer i's output to its source layer's output; the final (normed) states together."""
    mapping = {i + 1: t + 1 for i, t in enumerate(keep_layers)}
    mapping[len(keep_layers)] = teacher_layers
    return mapping


# --- tokenizers and stored top-k -----------------------------------------------------------------


def tokenizer_mismatch(student, teacher) -> str | None:
    """None when both tokenizers map every token and special token alike; else what differs."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        only = sorted(set(sv.items()) ^ set(tv.items()))[:1]
        return f"vocabularies differ ({len(sv)} vs {len(tv)} tokens; e.g. {only[0]!r})"
    for name in ("bos_token", "eos_token", "unk_token"):
        if getattr(student, name) != getattr(teacher, name):
            return f"{name} differs ({getattr(student, name)!r} vs {getattr(teacher, name)!r})"
    if set(student.all_special_tokens) != set(teacher.all_special_tokens):
        return "special tokens differ"
    return None


def token_pieces(tokenizer) -> tuple[list[str], dict[str, int]]:
    """Each id's text piece (as engines report logprob tokens), and piece -> id where unique."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))],
                                    skip_special_tokens=False)
    ids: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        ids[piece] = -1 if piece in ids else i  # -1: ambiguous, never a target
    return pieces, ids


def align_topk(example: dict[str, list[int]], logprobs: list[dict], pieces: list[str],
               piece_ids: dict[str, int], k: int) -> tuple[list[list[int]], list[list[float]], int]:
    """The stored top-k at each answer token (unshifted, like the labels), and how many matched.

    The i-th stored entry belongs to the i-th labelled token when its `token` is that token's
    piece; alignment stops at the first mismatch (later tokens keep -1 ids: no teacher term).
    Alternatives whose piece the student's vocabulary lacks are left out.
    """
    ids = [[-1] * k for _ in example["input_ids"]]
    lps = [[-math.inf] * k for _ in example["input_ids"]]
    answer = [i for i, label in enumerate(example["labels"]) if label != IGNORE]
    matched = 0
    for pos, entry in zip(answer, logprobs, strict=False):
        if pieces[example["input_ids"][pos]] != entry["token"]:
            break
        top = entry.get("top") or [[entry["token"], entry["logprob"]]]
        slot = 0
        for piece, logprob in top:
            if piece_ids.get(piece, -1) >= 0 and slot < k:
                ids[pos][slot], lps[pos][slot] = piece_ids[piece], float(logprob)
                slot += 1
        matched += 1
    return ids, lps, matched


def attach_topk(splits, tokenizer) -> tuple[int, int]:
    """Give each example of `(row, example)` pairs `topk_ids` / `topk_logprobs` from its row's
    `teacher_logprobs`; (matched, comparable) stored tokens over all of them. K is the widest
    stored top-k of the first split; (0, 0) when it has none."""
    pieces = token_pieces(tokenizer)
    stored = [row.get("teacher_logprobs") or [] for row, _ in splits[0]]
    k = max((len(entry.get("top") or [1]) for lp in stored for entry in lp), default=0)
    if k == 0:
        return 0, 0
    matched = total = 0
    for row, example in (pair for split in splits for pair in split):
        logprobs = row.get("teacher_logprobs") or []
        example["topk_ids"], example["topk_logprobs"], hit = align_topk(example, logprobs,
                                                                        *pieces, k)
        answer = sum(label != IGNORE for label in example["labels"])
        matched, total = matched + hit, total + min(len(logprobs), answer)
    return matched, total


# --- batches -------------------------------------------------------------------------------------


def collate(rows: list[dict[str, list]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad rows to the longest: ids with `pad_id`, labels -100, top-k ids -1 / -inf."""
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, fill: Any, dtype: torch.dtype) -> Tensor:
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=dtype)

    batch = {"input_ids": padded("input_ids", pad_id, torch.long),
             "labels": padded("labels", IGNORE, torch.long),
             "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(
                 r["input_ids"])) for r in rows], dtype=torch.long)}
    if "topk_ids" in rows[0]:
        k = len(rows[0]["topk_ids"][0])
        batch["topk_ids"] = padded("topk_ids", [-1] * k, torch.long)
        batch["topk_logprobs"] = padded("topk_logprobs", [-math.inf] * k, torch.float32)
    return batch


def bucketed(examples: list[dict], *, batch_size: int, pad_id: int,
             seed: int) -> list[dict[str, Tensor]]:
    """Batches of similar length in an order shuffled by `seed` (as `distill.data.bucket_batches`,
    keeping the top-k columns)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(chunks)
    return [collate([examples[i] for i in chunk], pad_id) for chunk in chunks]


class Batches:
    """Micro-batch number g of the run, for any g: epoch g // n in an order fixed by the seed.

    Rank r of w takes global micro-batches r, r + w, r + 2w, ... (DistributedSampler-like), so
    a resumed run sees exactly the batches the interrupted one would have.
    """

    def __init__(self, examples: list[dict], *, batch_size: int, pad_id: int, seed: int,
                 packing: bool, max_length: int):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.packed = pack(examples, max_length=max_length, pad_id=pad_id,
                           batch_size=batch_size) if packing else None
        self.n = len(self.packed) if packing else math.ceil(len(examples) / batch_size)
        self._epoch, self._batches = -1, []

    def __getitem__(self, g: int) -> dict[str, Tensor]:
        epoch, i = divmod(g, self.n)
        if epoch != self._epoch:
            if self.packed is not None:
                self._batches = list(self.packed)
                random.Random(self.seed + epoch).shuffle(self._batches)
            else:
                self._batches = bucketed(self.examples, batch_size=self.batch_size,
                                         pad_id=self.pad_id, seed=self.seed + epoch)
            self._epoch = epoch
        return self._batches[i]


# --- generation ----------------------------------------------------------------------------------


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def _generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
              temperature: float) -> list[list[int]]:
    """New tokens per prompt, cut after the first end-of-turn token."""
    from transformers import GenerationConfig

    ids, mask = _left_padded(prompts, pad_id)
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                              temperature=temperature if sample else None, top_k=0 if sample
                              else None, top_p=1.0 if sample else None,
                              pad_token_id=pad_id, eos_token_id=eos_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    new = []
    for row in out[:, ids.shape[1]:].tolist():
        new.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return new


@torch.no_grad()
def student_rollout(model, batch: dict[str, Tensor], *, pad_id: int, eos_id: int,
                    max_new_tokens: int, temperature: float) -> dict[str, Tensor]:
    """The batch with each answer replaced by one the student samples (GKD's on-policy data).

    The prompt is everything before the first labelled token; the new answer is labelled.
    """
    prompts = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                 strict=True):
        learned = (labels != IGNORE).nonzero()
        end = int(learned[0]) if len(learned) else int(mask.sum())
        prompts.append(ids[:end].tolist())
    answers = _generate(model, prompts, pad_id=pad_id, eos_id=eos_id,
                        max_new_tokens=max_new_tokens, temperature=temperature)
    rows = [{"input_ids": p + a, "labels": [IGNORE] * len(p) + a}
            for p, a in zip(prompts, answers, strict=True)]
    return collate(rows, pad_id)


@torch.no_grad()
def teacher_answers(teacher, tokenizer, prompts: list[list[dict[str, str]]], *,
                    settings: TeacherAnswers, seed: int, cache: Path, key: dict[str, Any],
                    progress) -> list[str]:
    """The teacher's answer to every prompt, cached in `cache` (JSONL, one answer a line, written
    a batch at a time) and reused while `key` (prompts, teacher, settings) stays the same."""
    meta = cache.with_suffix(".meta.json")
    answers: list[str] = []
    if cache.exists() and meta.exists() and json.loads(meta.read_text()) == key:
        answers = [json.loads(line)["answer"] for line in cache.read_text().splitlines()]
    else:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("")
        meta.write_text(json.dumps(key, indent=1))
    pad_id, eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
    bar = progress(total=len(prompts), initial=len(answers), desc="teacher answers", unit="prompt")
    while len(answers) < len(prompts):
        chunk = prompts[len(answers):len(answers) + settings.batch_size]
        torch.manual_seed(seed + len(answers))
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in chunk]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        new = _generate(teacher, ids, pad_id=pad_id, eos_id=eos_id,
                        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
        done = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in new]
        with open(cache, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"answer": a}, ensure_ascii=False) + "\n" for a in done)
        answers += done
        bar.update(len(chunk))
    bar.close()
    return answers


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --- files ---------------------------------------------------------------------------------------


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
