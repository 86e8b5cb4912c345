"""Any Hugging Face causal LM through transformers, decoded token by token with a KV cache.

Owns the model, its tokenizer and chat template (with the request's tools,
`serving.engines.tools`), and a decode loop written here (a forward pass with
`past_key_values` per token) that runs in one worker thread. Up to `n_parallel` generations are
decoded together: their prompts left-padded into one batch (attention mask and positions say
where each starts), one forward pass a step for all of them; a batch runs until its last answer
ends, and requests that come meanwhile wait for the next. Writing the loop ourselves gives
streaming, token ids, logprobs,
OpenAI sampling (temperature, top_p, a seeded `torch.Generator`), stop strings, end-of-sequence
tokens and an abort checked between tokens. A `response_format` masks the logits to what its
grammar allows before sampling (`serving.engines.constrain`).

Logprobs are the log-softmax of the model's raw logits (before temperature and top_p), like
vLLM's default and llama.cpp's, so the engines agree; `k` alternatives come from `topk`.

A folder written by `protege quantize --to int8` loads through `serving.engines.int8.load_int8`:
its layers keep int8 weights at run time (torch's fused int8 CPU matmul).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.engines.base import (
    AnswerScores,
    EngineError,
    EngineInfo,
    SamplingParams,
    TokenLogprob,
)
from serving.engines.config import TransformersEngine as TransformersEngineConfig
from serving.engines.constrain import TokenConstraint, vocabulary_from_hf
from serving.engines.threaded import CLOSING, Job, TokenOutput, WorkerThreadEngine


class IncrementalDetokenizer:
    """Text for a growing list of token ids, released only once it decodes to whole characters.

    Decodes a short window (the previous token plus the new ones) so that word-initial spaces
    and multi-byte characters split over tokens come out as the full decode would give them.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: context for the next piece
        self.read = 0  # ids before this have been released as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class TransformersEngine(WorkerThreadEngine):
    def __init__(self, config: TransformersEngineConfig, resolve_path: Callable[[str], Path]):
        super().__init__("transformers", config.n_parallel)
        self.config = config
        self.path = Path(resolve_path(config.model))
        # context_window is read from the model config at start().
        self.info = EngineInfo(
            model=config.gguf_file or self.path.name,
            context_window=None,
            supports_logprobs=True,
            max_concurrency=config.n_parallel,
        )
        self.model: Any = None
        self.tokenizer: Any = None
        self._eos: set[int] = set()
        self._cache_name = "past_key_values"
        self._vocabulary = None  # llguidance's view of the tokenizer, made at the first need

    async def start(self) -> None:
        if not self.path.is_dir():
            raise EngineError(f"transformers engine: model folder not found: {self.path}")
        if self.config.gguf_file and not (self.path / self.config.gguf_file).is_file():
            raise EngineError(
                f"transformers engine: gguf_file {self.config.gguf_file!r} not in {self.path}"
            )
        await self._in_worker(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from serving.engines.int8 import is_int8_folder, load_int8  # torch: imported on load

        extra = {"gguf_file": self.config.gguf_file} if self.config.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(self.path, **extra)
        if not extra and is_int8_folder(self.path):
            model = load_int8(self.path, dtype=getattr(torch, self.config.dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=getattr(torch, self.config.dtype), **extra
            )
        model = model.to(self.config.device).eval()
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        window = getattr(model.config, "max_position_embeddings", None)
        # transformers renamed `past_key_values` to `cache` (in and out) during 5.x.
        params = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in params else "past_key_values"
        self._takes_positions = "position_ids" in params  # left padding shifts the positions
        pad = tokenizer.pad_token_id
        self._pad = pad if pad is not None else min(eos, default=0)
        self.model, self.tokenizer, self._eos = model, tokenizer, eos
        self.info = EngineInfo(
            model=self.info.model,
            context_window=window,
            supports_logprobs=True,
            max_concurrency=self.config.n_parallel,
        )

    async def close(self) -> None:
        await self._stop_worker()
        self.model = self.tokenizer = None

    def _loaded(self) -> bool:
        return self.tokenizer is not None

    def _chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def _chat_tokens(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_tokens(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def _decode(self, jobs: list[Job]) -> None:
        """One batch: the prompts left-padded to one width (masked out), then one forward pass
        a step for all rows; a row whose answer is over is fed padding until the batch ends."""
        import torch

        device = self.config.device
        rows = [_Row(self, job) for job in jobs]
        width = max(len(job.prompt) for job in jobs)
        pad = self._pad
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs],
                           device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs],
                            device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        past, inputs = None, ids
        with torch.inference_mode():
            while not all(r.done for r in rows):
                extra = {"position_ids": positions} if self._takes_positions else {}
                result = self.model(input_ids=inputs, attention_mask=mask, use_cache=True,
                                     **{self._cache_name: past}, **extra)
                past = getattr(result, self._cache_name)
                logits = result.logits[:, -1].float()
                tokens = [pad if r.done else r.step(logits[i]) for i, r in enumerate(rows)]
                inputs = torch.tensor([[t] for t in tokens], device=device)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1

    def _text_tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _end_token(self) -> int | None:
        return self.tokenizer.eos_token_id

    def _score_tokens(self, prompt: list[int], tokens: list[int]) -> AnswerScores:
        """One forward pass over prompt and answer."""
        import torch

        ids = torch.tensor([prompt + tokens], device=self.config.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        return AnswerScores.of(logits.double().cpu().numpy(), tokens)

    def _logprobs(self, logits: Any, token: int, k: int) -> TokenLogprob:
        import torch

        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, min(k, logprobs.numel())) if k > 0 else None
        alternatives = () if top is None else tuple(
            (self._piece(int(i)), float(v)) for v, i in zip(top.values, top.indices, strict=True)
        )
        return TokenLogprob(self._piece(token), float(logprobs[token]), alternatives)

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


class _Row:
    """One generation of a batch: its seeded generator, grammar, text and output."""

    def __init__(self, engine: TransformersEngine, job: Job):
        import torch

        p = job.params
        self.engine, self.job = engine, job
        self.generator = torch.Generator(device=engine.config.device)
        seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
        self.generator.manual_seed(seed)
        self.constraint = None
        if p.response_format is not None:
            if engine._vocabulary is None:
                engine._vocabulary = vocabulary_from_hf(engine.tokenizer, engine._eos)
            self.constraint = TokenConstraint(engine._vocabulary, p.response_format)
        detok = IncrementalDetokenizer(engine.tokenizer)
        self.out = TokenOutput(job, detok.push, detok.flush, self.constraint)
        self.done = False
        if job.budget <= 0:
            self.close()

    def step(self, logits: Any) -> int:
        """Sample, emit and check the next token; the token the row is fed next."""
        import torch

        p, constraint = self.job.params, self.constraint
        if constraint is None:
            token = _sample(logits, p, self.generator)
        else:
            allowed = torch.from_numpy(constraint.allowed(logits.numel())).to(logits.device)
            token = _sample(logits.masked_fill(~allowed, float("-inf")), p, self.generator)
            constraint.accept(token)
        if self.job.stop.is_set():
            self.done = True
            self.job.end(EngineError(CLOSING))
            return token
        logprob = None if p.logprobs is None else self.engine._logprobs(logits, token, p.logprobs)
        if self.out.push(token, logprob, token in self.engine._eos):
            self.close()
        return token

    def close(self) -> None:
        self.done = True
        self.out.close(self.engine._label_probs(self.job.prompt, self.job.params))
        self.job.end()


def _sample(logits: Any, p: SamplingParams, generator: Any) -> int:
    """Greedy at temperature 0; else softmax(logits / temperature) cut to the top_p nucleus."""
    import torch

    if p.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > p.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
