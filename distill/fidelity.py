"""Fidelity: how closely a student reproduces its teacher, measured on held-out examples.

Owns the fidelity metrics the KD recipes log at validation and the validation gate reads:
pure functions over tensors (`top1_agreement`, `mean_kl`, `perplexity`) or texts
(`text_fidelity`), and thin wrappers that run models over batches (`logit_fidelity`,
`teacher_text_perplexity`), generate greedily (`greedy_answers`, `generation_fidelity`) or do
all of it (`fidelity_report`). Does not own thresholds or pass/fail decisions (the gate), the
batches (`distill.data`), the KL maths (`distill.losses.forward_kl`), the text scores
(`shadow.scoring`) or the embedding model (handed in as `embed`, e.g. `SemanticEmbedder`).

Conventions:
- logits are ``[B, L, V]``; ``mask`` is ``[B, L]`` bool, True = counted, None = every position.
  `top1_agreement` and `mean_kl` compare position i of the student with position i of the
  teacher: nothing is shifted, both sets of logits come from the same input.
- `perplexity` takes ``labels`` as `distill.data` makes them: aligned with ``input_ids``, NOT
  shifted, -100 where not counted. It shifts inside: the logits at t score ``labels[t + 1]``.
  `next_token_mask(labels)` marks those same positions t on the logits, and the model wrappers
  count top-1, KL and perplexity on it, so all three measure the answer tokens only.
- Means are over tokens pooled across batches, not means of per-batch means. A metric over no
  counted token raises ValueError rather than returning a number.
- Model wrappers run under ``torch.no_grad`` in eval mode and put back each model's train/eval
  mode afterwards, so the recipe can validate mid-training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.data import IGNORE
from distill.losses import forward_kl
from shadow.scoring import Embed, cosine, rouge_l

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Batch = dict[str, Tensor]  # input_ids, attention_mask, labels (position_ids when packed)
Prompt = str | list[dict[str, str]]  # a user message, or chat messages ending before the answer


# --- pure metrics over tensors ---------------------------------------------------------------


def next_token_mask(labels: Tensor) -> Tensor:
    """``[B, L]`` labels -> ``[B, L]`` bool: True at t when ``labels[t + 1]`` is counted (not
    -100), i.e. where the logits predict a counted token; the last position is always False."""
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor,
                   mask: Tensor | None = None) -> float:
    """Share of counted positions where the student's argmax token is the teacher's."""
    s, t = _counted(student_logits, teacher_logits, mask)
    return _top1_sum(s, t) / _some(s.shape[0], "top1_agreement")


def mean_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
            temperature: float = 1.0) -> float:
    """KL(teacher || student) per counted position, averaged (nats): `distill.losses.forward_kl`,
    so at a temperature T != 1 it is the KL of the tempered distributions times T**2."""
    s, t = _counted(student_logits, teacher_logits, mask)
    return _kl_sum(s, t, temperature) / _some(s.shape[0], "mean_kl")


def perplexity(logits: Tensor, labels: Tensor) -> float:
    """exp(mean cross-entropy) of the counted labels: logits ``[B, L, V]`` at t score
    ``labels[:, t + 1]`` (labels unshifted, as `distill.data` makes them; -100 not counted)."""
    total, n = _ce_sum(logits, labels)
    return math.exp(total / _some(n, "perplexity"))


# --- pure metrics over texts -----------------------------------------------------------------


def text_fidelity(answers: Sequence[str], references: Sequence[str], *,
                  embed: Embed | None = None) -> dict[str, float | None]:
    """Means over pairs of `shadow.scoring.rouge_l` and, when `embed` is given, of the cosine of
    the two answers' embeddings (negatives as 0, as `score_pair` does; `embed` is called once
    with every answer then every reference). `semantic` is None without `embed`."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    n = _some(len(answers), "text_fidelity")
    scores: dict[str, float | None] = {
        "rouge_l": sum(rouge_l(a, r) for a, r in zip(answers, references)) / n,
        "semantic": None,
    }
    if embed is not None:
        vectors = embed([*answers, *references])
        if len(vectors) != 2 * n:
            raise ValueError(f"embed returned {len(vectors)} vectors for {2 * n} texts")
        scores["semantic"] = sum(max(0.0, cosine(vectors[i], vectors[n + i]))
                                 for i in range(n)) / n
    return scores


# --- models ----------------------------------------------------------------------------------


def logit_fidelity(student: PreTrainedModel, teacher: PreTrainedModel, batches: Iterable[Batch],
                   *, temperature: float = 1.0) -> dict[str, float]:
    """{"top1_agreement", "mean_kl", "tokens"} over the next-token positions of the labels.
    Student and teacher must share one vocabulary (same tokenizer)."""
    stats = _run(student, teacher, batches, temperature)
    n = _some(stats["tokens"], "logit_fidelity")
    return {"top1_agreement": stats["top1"] / n, "mean_kl": stats["kl"] / n, "tokens": n}


def teacher_text_perplexity(student: PreTrainedModel, batches: Iterable[Batch]) -> float:
    """Perplexity of the labelled tokens (the teacher's answers) under `student`."""
    stats = _run(student, None, batches)
    return math.exp(stats["student_ce"] / _some(stats["tokens"], "teacher_text_perplexity"))


def greedy_answers(model: PreTrainedModel, prompts: Sequence[Prompt],
                   tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int) -> list[str]:
    """`model`'s greedy answer to each prompt, rendered with the tokenizer's chat template (as
    `distill.data` renders prompts), one prompt at a time; special tokens dropped."""
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    device = _device(model)
    answers = []
    with _eval(model):
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = ids.to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                                 pad_token_id=pad)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def generation_fidelity(student: PreTrainedModel, teacher_texts: Sequence[str],
                        prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase, *,
                        max_new_tokens: int, embed: Embed | None = None
                        ) -> dict[str, float | None]:
    """{"rouge_l", "semantic"}: `text_fidelity` of the student's greedy answers to `prompts`
    against the teacher's answers `teacher_texts` (same order)."""
    if len(teacher_texts) != len(prompts):
        raise ValueError(f"{len(teacher_texts)} teacher answers for {len(prompts)} prompts")
    answers = greedy_answers(student, prompts, tokenizer, max_new_tokens=max_new_tokens)
    return text_fidelity(answers, teacher_texts, embed=embed)


def fidelity_report(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    batches: Iterable[Batch], *, teacher: PreTrainedModel | None = None,
                    prompts: Sequence[Prompt] | None = None,
                    teacher_texts: Sequence[str] | None = None, max_new_tokens: int = 128,
                    embed: Embed | None = None, temperature: float = 1.0) -> dict[str, Any]:
    """Every metric in one dict, one forward pass of each model over `batches`:

    - `tokens`: counted (answer) tokens; `student_perplexity`: `teacher_text_perplexity`.
    - with `teacher` (same vocabulary): `top1_agreement`, `mean_kl`, and `teacher_perplexity`
      (the teacher's own perplexity on the same tokens, a floor to compare with); else None.
    - with `prompts`: `rouge_l`, `semantic` (`generation_fidelity`) against `teacher_texts`, or
      against the teacher's own greedy answers when only `teacher` is given; else None.
      `prompts` counts them.
    """
    stats = _run(student, teacher, batches, temperature)
    n = _some(stats["tokens"], "fidelity_report")
    paired = teacher is not None
    report: dict[str, Any] = {
        "tokens": n,
        "student_perplexity": math.exp(stats["student_ce"] / n),
        "teacher_perplexity": math.exp(stats["teacher_ce"] / n) if paired else None,
        "top1_agreement": stats["top1"] / n if paired else None,
        "mean_kl": stats["kl"] / n if paired else None,
        "rouge_l": None, "semantic": None, "prompts": 0,
    }
    if prompts:
        if teacher_texts is None:
            if teacher is None:
                raise ValueError("prompts need teacher_texts (the teacher's answers) or teacher")
            teacher_texts = greedy_answers(teacher, prompts, tokenizer,
                                           max_new_tokens=max_new_tokens)
        report |= generation_fidelity(student, teacher_texts, prompts, tokenizer,
                                      max_new_tokens=max_new_tokens, embed=embed)
        report["prompts"] = len(prompts)
    return report


# --- helpers ---------------------------------------------------------------------------------


def _some(n: int, what: str) -> int:
    if n == 0:
        raise ValueError(f"{what}: no counted token or text to average over")
    return n


def _counted(student_logits: Tensor, teacher_logits: Tensor,
             mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The counted positions of both, ``[N, V]`` each."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same [B, L, V] shape")
    if mask is None:
        return student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match [B, L] "
                         f"{tuple(student_logits.shape[:-1])}")
    mask = mask.bool()
    return student_logits[mask], teacher_logits[mask]


def _top1_sum(s: Tensor, t: Tensor) -> int:
    return int((s.argmax(-1) == t.argmax(-1)).sum())


def _kl_sum(s: Tensor, t: Tensor, temperature: float) -> float:
    return float(forward_kl(s[None], t[None], temperature=temperature)) * s.shape[0]


def _ce_sum(logits: Tensor, labels: Tensor) -> tuple[float, int]:
    mask = next_token_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    ce = F.cross_entropy(logits[mask].float(), targets, reduction="sum")
    return float(ce), targets.numel()


def _run(student: Any, teacher: Any, batches: Iterable[Batch],
         temperature: float = 1.0) -> dict[str, Any]:
    """Sums over every batch: counted tokens, top-1 agreements, KL, each model's CE."""
    if teacher is not None:
        _same_vocab(student.config.vocab_size, teacher.config.vocab_size)
    stats = {"tokens": 0, "top1": 0, "kl": 0.0, "student_ce": 0.0, "teacher_ce": 0.0}
    models = (student,) if teacher is None else (student, teacher)
    with _eval(*models):
        for batch in batches:
            labels = batch["labels"].cpu()
            mask = next_token_mask(labels)
            targets = labels[:, 1:][mask[:, :-1]]
            s = _counted_logits(student, batch, mask)
            stats["tokens"] += targets.numel()
            stats["student_ce"] += float(F.cross_entropy(s, targets, reduction="sum"))
            if teacher is None:
                continue
            t = _counted_logits(teacher, batch, mask)
            _same_vocab(s.shape[-1], t.shape[-1])
            stats["top1"] += _top1_sum(s, t)
            stats["kl"] += _kl_sum(s, t, temperature)
            stats["teacher_ce"] += float(F.cross_entropy(t, targets, reduction="sum"))
    return stats


def _counted_logits(model: Any, batch: Batch, mask: Tensor) -> Tensor:
    """``[N, V]`` float32 logits on the CPU at the positions of `mask`."""
    device = _device(model)
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")
              if k in batch}
    logits = model(**inputs).logits
    return logits[mask.to(device)].float().cpu()


def _same_vocab(student: int, teacher: int) -> None:
    if student != teacher:
        raise ValueError(f"logit fidelity needs one vocabulary: the student's has {student} "
                         f"tokens, the teacher's {teacher}; for a teacher with another "
                         "tokenizer compare texts (generation_fidelity, teacher_text_perplexity)")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, list | tuple) else [] if eos is None else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval(*models: Any):
    """Eval mode and no gradients inside; each model's own mode back afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in zip(models, modes):
            m.train(training)
