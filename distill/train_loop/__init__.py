"""The KD recipe's parts, kept out of `distill.recipes.kd` so that the recipe reads top to bottom:
`steps`, `topk`, `batches`, `generation`, `files`, `workers` (re-exported here as the
recipe's toolbox, `distill.train_loop as tl`).

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

from distill.train_loop.batches import Batches, bucketed, collate
from distill.train_loop.files import (
    checkpoints,
    code_version,
    final_metrics,
    load_checkpoint,
    plot_loss_curve,
    rng_state,
    save_checkpoint,
    save_hf_model,
    seed_everything,
    set_rng_state,
    weight_hashes,
)
from distill.train_loop.generation import pad_token_id, student_rollout, teacher_answers
from distill.train_loop.steps import (
    StepLosses,
    StudentModule,
    coin,
    cross_entropy,
    default_layer_map,
    model_inputs,
    projections_for,
    same_vocab,
    step_loss,
    teacher_top1,
    top1_agreement,
)
from distill.train_loop.topk import align_topk, attach_topk, token_pieces, tokenizer_mismatch
from distill.train_loop.workers import fit_with_ray

__all__ = ["Batches", "StepLosses", "StudentModule", "align_topk", "attach_topk", "bucketed",
           "checkpoints", "code_version", "coin", "collate", "cross_entropy", "default_layer_map",
           "final_metrics", "fit_with_ray", "load_checkpoint", "model_inputs", "pad_token_id",
           "plot_loss_curve", "projections_for", "rng_state", "same_vocab", "save_checkpoint",
           "save_hf_model", "seed_everything", "set_rng_state", "step_loss", "student_rollout",
           "teacher_answers", "teacher_top1", "token_pieces", "tokenizer_mismatch",
           "top1_agreement", "weight_hashes"]
