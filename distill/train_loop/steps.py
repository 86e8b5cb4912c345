"""The per-step maths of distillation (pure: tensors in, tensors out) and the student module
that DDP wraps (the model plus layer-wise projections)."""

from __future__ import annotations

import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import LossConfig
from distill.losses import distillation_loss, hidden_state_loss, token_mask, topk_kl


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
