"""Constrained decoding for the engines that own their token loop (llama.cpp, transformers).

A `TokenConstraint` follows one generation: before each token, `allowed(n)` is the boolean mask
of the tokens the grammar permits next; after sampling, `accept(token)` advances it; `done` says
the answer is complete (nothing but the end may follow). The grammar comes from
`serving.engines.structured.grammar_for`; the mask from llguidance's matcher over the engine's
vocabulary, wrapped once per loaded model (`vocabulary_from_*`, about half a second).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.engines.base import EngineError
from serving.engines.structured import CALL_CLOSE, CALL_OPEN, ResponseFormat, grammar_for


def vocabulary_from_llamacpp(vocab: Any) -> Any:
    """llguidance's view of a llama.cpp model's vocabulary."""
    from llguidance.llamacpp import lltokenizer_from_vocab

    return lltokenizer_from_vocab(vocab)


def vocabulary_from_hf(tokenizer: Any, eos: set[int]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer, ending on any of `eos`."""
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer, eos_token=sorted(eos) or None)


def special_tags(vocabulary: Any) -> tuple[str, ...]:
    """The call tags (`<tool_call>`, `</tool_call>`) that are one special token of the vocabulary
    (Qwen's are): a call may open with that token, as the model was taught."""
    tags = []
    for tag in (CALL_OPEN.strip(), CALL_CLOSE.strip()):
        ids = vocabulary.tokenize_str(tag)
        if len(ids) == 1 and vocabulary.is_special_token(ids[0]):
            tags.append(tag)
    return tuple(tags)


class TokenConstraint:
    def __init__(self, vocabulary: Any, fmt: ResponseFormat):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(vocabulary, grammar_for(fmt, special_tags(vocabulary)),
                                 log_level=0)
        self._check()
        words = (vocabulary.vocab_size + 31) // 32
        self._bits = np.zeros(words, dtype=np.int32)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise EngineError(f"constrained decoding failed: {self.matcher.get_error()[:300]}")

    def allowed(self, n: int) -> np.ndarray:
        """Which of the model's `n` logits may be sampled next (beyond the vocabulary: none)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little").astype(bool)
        if len(bits) >= n:
            return bits[:n]
        return np.concatenate([bits, np.zeros(n - len(bits), dtype=bool)])

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    @property
    def done(self) -> bool:
        """The answer is complete: the grammar allows only the end of generation now."""
        return self.matcher.is_stopped()


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """OpenAI sampling over (masked) logits: greedy at temperature 0, else the top_p nucleus of
    softmax(logits / temperature). Masked-out logits are -inf and never drawn."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        outside = np.cumsum(sorted_probs) - sorted_probs > top_p
        probs = np.zeros_like(probs)
        probs[order[~outside]] = sorted_probs[~outside]
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
