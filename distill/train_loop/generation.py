"""Generation with the student (rollouts) and the teacher (answers), left-padded, batched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.config import TeacherAnswers
from distill.data import IGNORE
from distill.train_loop.batches import collate


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
