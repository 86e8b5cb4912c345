"""Distillation losses: pure functions, tensors in, tensors out.

Owns the maths of knowledge distillation on logits (forward/reverse KL, the GKD generalised JSD,
KL against a teacher that only returns top-k logprobs, the soft+hard mix) and on hidden states.
Does not own models, tokenisation, label shifting or teacher calls: every tensor arrives already
aligned (position i of the logits scores position i of the labels).

Conventions, shared by every function here:
- logits are ``[B, L, V]``; ``mask`` is ``[B, L]`` bool, True = the token is counted; ``None``
  counts every token. Counted tokens are selected *before* any arithmetic, so masked-out
  positions may hold arbitrary values without touching the result or its gradient.
- the result is the mean over counted tokens (a scalar; 0 when no token is counted).
- maths runs in float32 (inputs are cast up), so bf16 inputs give finite, accurate results and
  gradients flow back in the input dtype.
- ``temperature`` T divides the logits of both models and the result is multiplied by T**2
  (Hinton et al. 2015), so gradient magnitudes do not shrink as T grows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
KINDS = ("forward", "reverse", "jsd")


def token_mask(labels: Tensor) -> Tensor:
    """``[B, L]`` long labels -> ``[B, L]`` bool, True where the label is not -100."""
    return labels != IGNORE_INDEX


def _check(temperature: float, beta: float = 0.5) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in the range [0.0, 1.0], got {beta}")


def _tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """``[B, L, ...]`` -> ``[N, ...]``: the counted tokens only, same dtype."""
    if mask is None:
        return x.reshape(-1, *x.shape[2:])
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match [B, L] {tuple(x.shape[:2])}"
        )
    return x[mask.bool()]


def _mean(per_token: Tensor) -> Tensor:
    """``[N]`` -> scalar mean; 0 (with a gradient path) when N == 0."""
    return per_token.sum() / max(per_token.numel(), 1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim, ``[N, V]`` -> ``[N]``. Terms with p == 0 are 0, not NaN."""
    live = log_p > float("-inf")
    log_p = torch.where(live, log_p, 0.0)  # keep -inf out of the graph (its gradient would be NaN)
    return torch.where(live, log_p.exp() * (log_p - log_q), 0.0).sum(-1)


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same [B, L, V] shape"
        )
    s = F.log_softmax(_tokens(student_logits, mask).float() / temperature, dim=-1)
    t = F.log_softmax(_tokens(teacher_logits, mask).float() / temperature, dim=-1)
    return s, t


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None) -> Tensor:
    """KL(p_teacher || p_student) * T**2, mean over counted tokens. Logits ``[B, L, V]`` -> scalar.

    Mean-seeking: the student is pushed to cover every token the teacher gives mass to.
    """
    _check(temperature)
    s, t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean(_kl(t, s)) * temperature**2


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None) -> Tensor:
    """KL(p_student || p_teacher) * T**2, mean over counted tokens. Logits ``[B, L, V]`` -> scalar.

    Mode-seeking: the student is pushed to put mass only where the teacher does.
    """
    _check(temperature)
    s, t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean(_kl(s, t)) * temperature**2


def generalized_jsd(
    student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None
) -> Tensor:
    """Generalised JSD of GKD (Agarwal et al. 2024, eq. 1), mean over counted tokens.

    Logits ``[B, L, V]`` -> scalar. With m = beta * p_teacher + (1 - beta) * p_student:
    ``beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m)``; symmetric at beta = 0.5.
    As in TRL (``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``, checked against 1.16),
    beta = 0 is special-cased to forward KL(teacher || student) and beta = 1 to reverse
    KL(student || teacher) (the formula itself tends to 0 at both ends). At T = 1 this equals
    TRL's loss with ``labels`` (-100 where ``mask`` is False) and ``reduction="batchmean"``.
    Unlike TRL, whose trainer never passes its temperature and which does not rescale, the
    logits here are divided by T and the result multiplied by T**2.
    """
    _check(temperature, beta)
    if beta == 0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask)
    s, t = _log_probs(student_logits, teacher_logits, temperature, mask)
    log_m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))  # log of the mixture m
    jsd = beta * _kl(t, log_m) + (1 - beta) * _kl(s, log_m)
    return _mean(jsd) * temperature**2


def topk_kl(
    student_logits, teacher_topk_ids, teacher_topk_logprobs, *, temperature=1.0, mask=None
) -> Tensor:
    """KL(teacher top-k || student) * T**2 for a teacher that returns only its top-k logprobs.

    Shapes: ``student_logits`` ``[B, L, V]``; ``teacher_topk_ids`` ``[B, L, K]`` long;
    ``teacher_topk_logprobs`` ``[B, L, K]``, the teacher's log-probabilities at temperature 1.
    Slots whose logprob is -inf or whose id is < 0 are padding and ignored.

    The teacher's top-k is renormalised to sum to 1 after tempering (p_t ∝ exp(logprob / T)).
    The student is *not* renormalised over the top-k: q_s is its full-vocabulary softmax at T,
    gathered at the teacher's ids, so mass the student puts outside the teacher's top-k is
    penalised. Returns sum_k p_t (log p_t - log q_s), mean over counted tokens; equals
    ``forward_kl`` when K = V. A token with no valid slot contributes 0.
    """
    _check(temperature)
    ids = _tokens(teacher_topk_ids, mask).long()
    lp = _tokens(teacher_topk_logprobs, mask).float()
    valid = (ids >= 0) & (lp > float("-inf"))
    log_t = F.log_softmax(torch.where(valid, lp / temperature, float("-inf")), dim=-1)
    log_t = torch.where(valid, log_t, 0.0)  # also clears rows with no valid slot (all NaN)
    log_s = F.log_softmax(_tokens(student_logits, mask).float() / temperature, dim=-1)
    log_s = log_s.gather(-1, ids.clamp_min(0))
    kl = torch.where(valid, log_t.exp() * (log_t - log_s), 0.0).sum(-1)
    return _mean(kl) * temperature**2


class LossParts(NamedTuple):
    """What ``distillation_loss`` returns: call ``.total.backward()``; log ``soft`` and ``hard``."""

    total: Tensor  # alpha * soft + (1 - alpha) * hard
    soft: Tensor  # the distillation term (already scaled by T**2)
    hard: Tensor  # cross-entropy against the labels, at temperature 1


def distillation_loss(
    student_logits, teacher_logits, labels, *, alpha, temperature, kind="forward", beta=0.5
) -> LossParts:
    """``alpha * soft + (1 - alpha) * cross_entropy(labels)``, both over tokens with label != -100.

    Shapes: logits ``[B, L, V]``, ``labels`` ``[B, L]`` long. Labels must already be aligned with
    the logits (position i's logits score ``labels[:, i]``): nothing is shifted here.
    ``kind``: "forward" (``forward_kl``), "reverse" (``reverse_kl``) or "jsd"
    (``generalized_jsd`` with ``beta``). Returns ``LossParts(total, soft, hard)``, scalars.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in the range [0.0, 1.0], got {alpha}")
    _check(temperature, beta)
    mask = token_mask(labels)
    if kind == "jsd":
        soft = generalized_jsd(
            student_logits, teacher_logits, beta=beta, temperature=temperature, mask=mask
        )
    else:
        fn = forward_kl if kind == "forward" else reverse_kl
        soft = fn(student_logits, teacher_logits, temperature=temperature, mask=mask)
    logits = _tokens(student_logits, mask).float()
    hard = _mean(F.cross_entropy(logits, labels[mask], reduction="none"))
    return LossParts(alpha * soft + (1 - alpha) * hard, soft, hard)


def hidden_state_loss(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    layer_map: Mapping[int, int] | Sequence[tuple[int, int]],
    projections: Mapping[str, torch.nn.Module] | None = None,
    kind: str = "mse",
    mask: Tensor | None = None,
) -> Tensor:
    """Match student hidden states to the teacher's, mean over the mapped layers -> scalar.

    ``student_hidden`` / ``teacher_hidden``: one ``[B, L, D_s]`` / ``[B, L, D_t]`` tensor per
    layer (as HF ``output_hidden_states`` gives). ``layer_map``: student layer -> teacher layer,
    a dict or ``(student, teacher)`` pairs. ``projections[str(student_layer)]`` maps D_s -> D_t
    and is required when the widths differ. ``kind``: "mse" (squared error averaged over hidden
    dims, then over counted tokens) or "cosine" (1 - cosine similarity per token, mean over
    counted tokens).
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    pairs = list(layer_map.items() if isinstance(layer_map, Mapping) else layer_map)
    if not pairs:
        raise ValueError("layer_map is empty: map at least one student layer to a teacher layer")
    projections = dict(projections or {})  # a ModuleDict has no .get
    losses = []
    for s_layer, t_layer in pairs:
        h_s, h_t = _tokens(student_hidden[s_layer], mask), _tokens(teacher_hidden[t_layer], mask)
        proj = projections.get(str(s_layer))
        if proj is not None:  # run in the projection's dtype, on counted tokens only
            weight = next(proj.parameters(), None)
            h_s = proj(h_s if weight is None else h_s.to(weight.dtype))
        elif h_s.shape[-1] != h_t.shape[-1]:
            raise ValueError(
                f"student layer {s_layer} has width {h_s.shape[-1]} but teacher layer {t_layer} "
                f"has width {h_t.shape[-1]}: pass projections={{'{s_layer}': "
                f"nn.Linear({h_s.shape[-1]}, {h_t.shape[-1]})}}"
            )
        h_s, h_t = h_s.float(), h_t.float()
        if kind == "mse":
            per_token = (h_s - h_t).pow(2).mean(-1)
        else:
            per_token = 1 - F.cosine_similarity(h_s, h_t, dim=-1)
        losses.append(_mean(per_token))
    return torch.stack(losses).mean()
