"""A GGUF model through llama-cpp-python: the CPU default engine.

Owns the `Llama` object, its chat template (the GGUF's `tokenizer.chat_template`, rendered here
with the request's tools, `serving.engines.tools`, so the prompt tokens are known before
generation) and a token loop over `Llama.generate` that runs in one worker thread: one generation at a time per model, later requests wait their turn.
Each sampled token is checked against end-of-generation tokens, stop strings and the budget,
and a closed iterator sets an event the loop checks at every token.

Sampling is OpenAI's: temperature (0 is greedy) and top_p only; llama.cpp's own top_k, min_p
and repeat penalty are switched off. A `response_format` is enforced by sampling here, from the
logits its grammar allows (`serving.engines.constrain`); llama.cpp then only evaluates. Logprobs
are the log-softmax of the raw logits of the position that produced each token (read from the
context, so `logits_all` is not needed).
"""

from __future__ import annotations

import codecs
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from serving.engines.base import (
    AnswerScores,
    EngineError,
    EngineInfo,
    SamplingParams,
    TokenLogprob,
)
from serving.engines.config import LlamaCppEngine as LlamaCppEngineConfig
from serving.engines.constrain import TokenConstraint, sample, vocabulary_from_llamacpp
from serving.engines.threaded import Job, TokenOutput, WorkerThreadEngine


class LlamaCppEngine(WorkerThreadEngine):
    def __init__(self, config: LlamaCppEngineConfig, resolve_path: Callable[[str], Path]):
        super().__init__("llamacpp")
        self.config = config
        self.path = Path(resolve_path(config.path))
        self.info = EngineInfo(
            model=self.path.name,
            context_window=config.n_ctx,
            supports_logprobs=True,
            max_concurrency=1,
        )
        self._llm = None
        self._template: str | None = None  # the GGUF's tokenizer.chat_template
        self._chat = None  # its Jinja2ChatFormatter
        self._vocabulary = None  # llguidance's view of the vocabulary, made at the first need

    async def start(self) -> None:
        if not self.path.is_file():
            raise EngineError(f"llamacpp engine: GGUF file not found: {self.path}")
        await self._in_worker(self._load)

    def _load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        threads = self.config.n_threads or len(os.sched_getaffinity(0))
        try:
            llm = Llama(
                model_path=str(self.path),
                n_ctx=self.config.n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=self.config.n_batch,
                n_gpu_layers=self.config.n_gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"llamacpp engine: cannot load {self.path}: {e}") from e
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            model = llm._model
            eos, bos = model.token_eos(), model.token_bos()
            self._chat = Jinja2ChatFormatter(
                template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                add_generation_prompt=True,
            )
            self._template = template
        self._llm = llm

    async def close(self) -> None:
        await self._stop_worker()
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _loaded(self) -> bool:
        return self._llm is not None

    def _chat_template(self) -> str | None:
        return self._template

    def _chat_tokens(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        rendered = self._chat(messages=messages, tools=tools)
        return self._llm.tokenize(rendered.prompt.encode(), add_bos=False, special=True)

    def _prompt_tokens(self, prompt: str) -> list[int]:
        return self._llm.tokenize(prompt.encode(), add_bos=True, special=True)

    def _decode(self, job: Job) -> bool:
        import llama_cpp

        llm, p = self._llm, job.params
        vocab = llm._model.vocab
        seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**31)
        constraint = None
        if p.response_format is not None:
            if self._vocabulary is None:
                self._vocabulary = vocabulary_from_llamacpp(vocab)
            constraint = TokenConstraint(self._vocabulary, p.response_format)
            tokens = self._constrained(job.prompt, p, seed, constraint)
        else:
            llm.set_seed(seed)
            tokens = llm.generate(job.prompt, top_k=0, top_p=p.top_p, min_p=0.0, typical_p=1.0,
                                  temp=p.temperature, repeat_penalty=1.0, reset=True)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = TokenOutput(job, lambda t: decoder.decode(llm.detokenize([t])),
                          lambda: decoder.decode(b"", final=True), constraint)
        if job.budget > 0:
            for token in tokens:
                if job.stop.is_set():
                    return False
                logprob = None if p.logprobs is None else self._logprobs(token, p.logprobs)
                if out.push(token, logprob, llama_cpp.llama_vocab_is_eog(vocab, token)):
                    break
        out.close(self._label_probs(job.prompt, p))
        return True

    def _text_tokens(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode(), add_bos=False, special=False)

    def _end_token(self) -> int | None:
        eos = self._llm.token_eos()
        return None if eos == -1 else eos

    def _score_tokens(self, prompt: list[int], tokens: list[int]) -> AnswerScores:
        """The prompt through `_prefill` (its KV cache reused), then the answer in batches of
        `n_batch` with the logits of every position kept."""
        llm = self._llm
        self._prefill(prompt)
        parts = [AnswerScores.of(self._last_logits(), tokens[:1])]
        for start in range(0, len(tokens) - 1, llm.n_batch):
            chunk = tokens[start:min(start + llm.n_batch, len(tokens) - 1)]
            parts.append(AnswerScores.of(self._eval_all_logits(chunk),
                                         tokens[start + 1:start + 1 + len(chunk)]))
        return AnswerScores.join(parts)

    def _eval_all_logits(self, chunk: list[int]) -> np.ndarray:
        """Evaluate `chunk` (at most `n_batch` tokens) after what the context holds, keeping
        the logits of each position: `[len(chunk), n_vocab]`."""
        llm = self._llm
        n_past = llm.n_tokens
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        llm._batch.set_batch(chunk, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past:n_past + len(chunk)] = chunk
        llm.n_tokens = n_past + len(chunk)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), llm.n_vocab()))

    def _last_logits(self) -> np.ndarray:
        llm = self._llm
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))

    def _constrained(self, prompt: list[int], p: SamplingParams, seed: int,
                     constraint: TokenConstraint) -> Iterator[int]:
        """Tokens sampled here, from the logits the grammar allows (llama.cpp only evaluates)."""
        llm = self._llm
        rng = np.random.default_rng(seed)
        self._prefill(prompt)
        while True:
            logits = self._last_logits()
            logits = np.where(constraint.allowed(len(logits)), logits, -np.inf)
            token = sample(logits, p.temperature, p.top_p, rng)
            constraint.accept(token)
            yield token
            llm.eval([token])

    def _prefill(self, prompt: list[int]) -> None:
        """Evaluate `prompt`, keeping the KV cache of the longest prefix it shares with what the
        context holds (as `Llama.generate` does): a long system or tool prompt sent with every
        request is evaluated once. At least one token is evaluated, for fresh logits."""
        llm = self._llm
        keep = 0
        for held, token in zip(llm.input_ids[:llm.n_tokens], prompt):
            if held != token:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)
        if keep > 0 and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
        else:
            keep = 0
            llm.reset()
        llm.eval(prompt[keep:])

    def _logprobs(self, token: int, k: int) -> TokenLogprob:
        """The chosen token's logprob and the `k` best, from the logits that sampled it."""
        logprobs = _log_softmax(self._last_logits())
        top = np.argpartition(-logprobs, k)[:k] if 0 < k < len(logprobs) else np.arange(0)
        top = top[np.argsort(-logprobs[top])]
        return TokenLogprob(
            self._piece(token),
            float(logprobs[token]),
            tuple((self._piece(int(t)), float(logprobs[t])) for t in top),
        )

    def _piece(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")



def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())
