"""Batching: length-bucketed or packed, reshuffled per epoch, sharded by rank."""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import Tensor

from distill.data import IGNORE, pack


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
