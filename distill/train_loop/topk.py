"""Tokenizer comparison, and stored top-k teacher logprobs turned into tensors aligned to the
student's tokens."""

from __future__ import annotations

import math

from distill.data import IGNORE


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
