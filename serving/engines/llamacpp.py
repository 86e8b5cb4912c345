"""A GGUF model through llama.cpp (llama-cpp-python's low-level API): the CPU default engine.

Owns the model, its chat template (the GGUF's `tokenizer.chat_template`, rendered with the
request's tools, `serving.engines.tools`, so the prompt tokens are known before generation),
tokenizing, and what each sequence does with its logits (`LlamaSampler`). Sequences are decoded
together, `n_parallel` at once, by `serving.engines.llama_batch`; `n_parallel: 1` decodes one
generation at a time, the others waiting their turn.

Sampling is OpenAI's: temperature (0 is greedy) and top_p only, seeded per generation. A
`response_format` masks the logits to what its grammar allows before sampling
(`serving.engines.constrain`). Logprobs are the log-softmax of the raw logits of the position
that produced each token. Each token is checked against the end-of-generation tokens, stop
strings and the budget (`serving.engines.threaded.TokenOutput`).
"""

from __future__ import annotations

import asyncio
import codecs
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serving.engines.base import (
    AnswerScores,
    EngineError,
    EngineInfo,
    TokenLogprob,
)
from serving.engines.config import LlamaCppEngine as LlamaCppEngineConfig
from serving.engines.constrain import TokenConstraint, sample, vocabulary_from_llamacpp
from serving.engines.threaded import Job, TokenLoopEngine, TokenOutput


class LlamaCppEngine(TokenLoopEngine):
    def __init__(self, config: LlamaCppEngineConfig, resolve_path: Callable[[str], Path]):
        super().__init__("llamacpp")
        self.config = config
        self.path = Path(resolve_path(config.path))
        self.info = EngineInfo(
            model=self.path.name,
            context_window=config.n_ctx,
            supports_logprobs=True,
            max_concurrency=config.n_parallel,
        )
        self.model = None  # llama_cpp's LlamaModel: weights, vocabulary, metadata
        self.batcher = None  # the context and its scheduler thread
        self._template: str | None = None  # the GGUF's tokenizer.chat_template
        self._chat = None  # its Jinja2ChatFormatter
        self._vocabulary = None  # llguidance's view of the vocabulary, made at the first need

    async def start(self) -> None:
        if not self.path.is_file():
            raise EngineError(f"llamacpp engine: GGUF file not found: {self.path}")
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        # llama_cpp loads only with this engine.
        import llama_cpp
        from llama_cpp import _internals, _logger
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from serving.engines.llama_batch import Batcher  # llama_cpp

        _logger.set_verbose(False)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.config.n_gpu_layers
        try:
            model = _internals.LlamaModel(path_model=str(self.path), params=params,
                                          verbose=False)
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"llamacpp engine: cannot load {self.path}: {e}") from e
        template = model.metadata().get("tokenizer.chat_template")
        if template:
            eos, bos = model.token_eos(), model.token_bos()
            self._chat = Jinja2ChatFormatter(
                template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                add_generation_prompt=True,
            )
            self._template = template
        self._eog: dict[int, bool] = {}
        self._bytes: dict[int, bytes] = {}
        c = self.config
        try:
            self.batcher = Batcher(
                model, n_ctx=c.n_ctx, n_parallel=c.n_parallel, n_batch=c.n_batch,
                prefill_chunk=c.prefill_chunk, flash_attn=c.flash_attn,
                n_threads=c.n_threads or len(os.sched_getaffinity(0)), start=self._sampler)
        except (ValueError, RuntimeError) as e:
            model.close()
            raise EngineError(f"llamacpp engine: cannot make a context for {self.path}: {e}"
                              ) from e
        self.model = model

    async def close(self) -> None:
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)
            self.batcher = None
        if self.model is not None:
            self.model.close()
            self.model = None

    def _submit(self, job: Job) -> None:
        self.batcher.submit(job)

    async def _in_worker(self, fn):
        return await asyncio.wrap_future(self.batcher.call(fn))

    # -- tokens ------------------------------------------------------------------------------

    def _loaded(self) -> bool:
        return self.model is not None

    def _chat_template(self) -> str | None:
        return self._template

    def _chat_tokens(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        rendered = self._chat(messages=messages, tools=tools)
        return self.model.tokenize(rendered.prompt.encode(), False, True)

    def _prompt_tokens(self, prompt: str) -> list[int]:
        return self.model.tokenize(prompt.encode(), True, True)

    def _text_tokens(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode(), False, False)

    def _end_token(self) -> int | None:
        eos = self.model.token_eos()
        return None if eos == -1 else eos

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return self.model.detokenize(tokens, special)

    def _score_tokens(self, prompt: list[int], tokens: list[int]) -> AnswerScores:
        return self.batcher.forced(prompt, tokens)

    # Each sampled token asks these; remembered, as every call into llama.cpp hands the GIL over.

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            import llama_cpp

            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.model.vocab, token))
        return eog

    def token_bytes(self, token: int) -> bytes:
        """`token`'s text as llama.cpp detokenizes it alone (special tokens as nothing)."""
        text = self._bytes.get(token)
        if text is None:
            text = self._bytes[token] = self.detokenize([token])
        return text

    # -- a sequence's logits -----------------------------------------------------------------

    def _sampler(self, job: Job) -> LlamaSampler:
        """A generation's sampler (scheduler thread: the vocabulary is built there once)."""
        constraint = None
        if job.params.response_format is not None:
            if self._vocabulary is None:
                self._vocabulary = vocabulary_from_llamacpp(self.model.vocab)
            constraint = TokenConstraint(self._vocabulary, job.params.response_format)
        return LlamaSampler(self, job, constraint)

    def logprob(self, logits: np.ndarray, token: int, k: int) -> TokenLogprob:
        """The chosen token's logprob and the `k` best, from the logits that sampled it."""
        logprobs = _log_softmax(logits)
        top = np.argpartition(-logprobs, k)[:k] if 0 < k < len(logprobs) else np.arange(0)
        top = top[np.argsort(-logprobs[top])]
        return TokenLogprob(
            self.piece(token),
            float(logprobs[token]),
            tuple((self.piece(int(t)), float(logprobs[t])) for t in top),
        )

    def piece(self, token: int) -> str:
        return self.detokenize([token], special=True).decode("utf-8", errors="replace")


class LlamaSampler:
    """One generation's side of the batch: samples each token from its logits (masked by its
    grammar), emits it through its `TokenOutput`, and ends the answer."""

    def __init__(self, engine: LlamaCppEngine, job: Job, constraint: TokenConstraint | None):
        p = job.params
        self.engine, self.job, self.constraint = engine, job, constraint
        seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**31)
        self.rng = np.random.default_rng(seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.out = TokenOutput(job, lambda t: decoder.decode(engine.token_bytes(t)),
                               lambda: decoder.decode(b"", final=True), constraint)

    def next(self, logits: np.ndarray) -> int | None:
        p, constraint = self.job.params, self.constraint
        masked = logits
        if constraint is not None:
            masked = np.where(constraint.allowed(len(logits)), logits, -np.inf)
        token = sample(masked, p.temperature, p.top_p, self.rng)
        if constraint is not None:
            constraint.accept(token)
        logprob = None if p.logprobs is None else self.engine.logprob(logits, token, p.logprobs)
        if self.out.push(token, logprob, self.engine.is_eog(token)):
            self.close()
            return None
        return token

    def close(self) -> None:
        self.out.close(self.engine._label_probs(self.job.prompt, self.job.params))
        self.job.end()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())
