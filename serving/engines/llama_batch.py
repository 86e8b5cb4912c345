"""Continuous batching for llama.cpp: several sequences decoded together in one context.

A `Batcher` owns a llama.cpp context with `n_parallel` sequence slots (each its own KV cache of
`n_ctx` tokens) and one scheduler thread. Each step it builds one batch: the last sampled token
of every sequence that is decoding, then prompt tokens of sequences still prefilling, at most
`prefill_chunk` each and `n_batch` in all, so a long prompt is evaluated over several steps and
does not stall the answers in flight. New generations join between steps, in the order they
came, as slots free up; a stopped one (client gone) leaves at the next step.

Each slot is a KV stream of its own, and llama.cpp evaluates a batch in one pass over the
weights per run of consecutive slots it meets in batch order. So a step lists its sequences in
slot order, and a new generation takes a slot next to the running ones unless another slot's
cache saves it more than `RUN_COST` prompt tokens.

A slot keeps the tokens it holds after its sequence ends. A new prompt's slot keeps its KV
cache up to the prefix they share: a system or tool prompt sent with every request is evaluated
once per slot.

What a sequence does with its logits (sampling, grammar, logprobs, stop strings, the deltas)
is its `Sampler`'s, made by the engine (`serving.engines.llamacpp`). Teacher-forced scoring
(`forced`) uses one more slot, reserved for it; `call` runs any work on the scheduler thread
between steps. Everything that touches the context runs on that thread.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import llama_cpp
import numpy as np
from llama_cpp import _internals

from serving.engines.base import AnswerScores, EngineError
from serving.engines.threaded import CLOSING, Job


class Sampler(Protocol):
    def next(self, logits: np.ndarray) -> int | None:
        """The token sampled from `logits` (emitted); None when the answer is over (closed)."""

    def close(self) -> None:
        """End the answer: its last delta and the end of the stream."""


@dataclass(eq=False)
class Slot:
    """A sequence id of the context and the tokens its KV cache holds, in position order."""

    seq_id: int
    held: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Running:
    """A generation in a slot: `pending` tokens still to evaluate, the last one's logits read
    once the prompt is in (then each step evaluates the token sampled before)."""

    job: Job
    slot: Slot
    sampler: Sampler
    pending: list[int]


# Prompt tokens one more run of consecutive slots in a step is worth: a pass over the weights in
# each of an answer's steps (about 9 ms for the packaged student on one core of the 2-core test
# machine) outweighs evaluating a few dozen prompt tokens once (about 7 ms each there).
RUN_COST = 64


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Batcher:
    def __init__(self, model: _internals.LlamaModel, *, n_ctx: int, n_parallel: int,
                 n_batch: int, prefill_chunk: int, n_threads: int, flash_attn: bool,
                 start: Callable[[Job], Sampler]):
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = n_parallel + 1  # the last slot is `forced`'s
        params.n_ctx = n_ctx * params.n_seq_max  # each slot its own n_ctx (kv_unified off)
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = False
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        self.n_vocab = model.n_vocab()
        self.n_batch, self.prefill_chunk = n_batch, max(1, min(prefill_chunk, n_batch))
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self._memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self._slots = [Slot(i) for i in range(n_parallel)]
        self._scratch = Slot(n_parallel)
        self._start = start
        self._active: list[Running] = []
        self._queue: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._closing = False
        self._wake = threading.Condition()
        # What the tests read: decode steps run, tokens evaluated, the most sequences one step
        # sampled from.
        self.steps = self.evaluated = self.widest = 0
        self._thread = threading.Thread(target=self._loop, name="llamacpp-batcher", daemon=True)
        self._thread.start()

    # -- from other threads ------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closing:
                job.end(EngineError(CLOSING))
                return
            self._queue.append(job)
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """`fn()` on the scheduler thread before the next step; its result as a future."""
        future: Future = Future()
        with self._wake:
            if self._closing:
                future.set_exception(EngineError(CLOSING))
            else:
                self._calls.append((fn, future))
                self._wake.notify()
        return future

    def close(self) -> None:
        """End running and queued generations with an error and stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._batch.close()
        self.ctx.close()

    # -- the scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._closing or self._queue or self._calls or self._active):
                    self._wake.wait()
                if self._closing:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
            if self._closing:
                break
            self._admit()
            self._active = [r for r in self._active if not self._left(r)]
            if self._active:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - every sequence in the batch fails
                    for r in self._active:
                        self._clear(r.slot)
                        r.job.end(EngineError(f"llamacpp decode failed: {e}"))
                    self._active = []
        self._end_all()

    def _admit(self) -> None:
        """Queued generations into free slots, first come first served."""
        while True:
            with self._wake:
                free = [s for s in self._slots if all(r.slot is not s for r in self._active)]
                if not free or not self._queue:
                    return
                job = self._queue.popleft()
            if job.stop.is_set():
                job.end()
                continue
            slot = self._pick(free, job.prompt)
            try:
                sampler = self._start(job)
                if job.budget <= 0:
                    sampler.close()
                    continue
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                job.end(e)
                continue
            keep = self._reuse(slot, job.prompt)
            self._active.append(Running(job, slot, sampler, job.prompt[keep:]))

    def _pick(self, free: list[Slot], prompt: list[int]) -> Slot:
        """The free slot for `prompt`: the one whose cache saves the most prompt tokens, where a
        slot with no running neighbour costs `RUN_COST` tokens (each run of consecutive slots is
        one more pass over the weights, every step); the lowest of equals."""
        busy = {r.slot.seq_id for r in self._active}

        def worth(s: Slot) -> int:
            neighbours = (s.seq_id - 1 in busy) + (s.seq_id + 1 in busy)
            return common_prefix(s.held, prompt) + RUN_COST * (neighbours - 1 if busy else 0)

        return max(free, key=worth)

    def _reuse(self, slot: Slot, tokens: list[int]) -> int:
        """Keep the KV cache of the prefix `slot` shares with `tokens` (at least one token of
        `tokens` left to evaluate, for fresh logits); the number of tokens kept."""
        keep = min(common_prefix(slot.held, tokens), len(tokens) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            keep = 0
            self._clear(slot)
        del slot.held[keep:]
        return keep

    def _clear(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.held.clear()

    def _left(self, r: Running) -> bool:
        """The consumer is gone: the slot frees up, its cache kept for a later prompt."""
        if not r.job.stop.is_set():
            return False
        if len(r.slot.held) < len(r.job.prompt):  # cut mid-prompt: nothing worth keeping
            self._clear(r.slot)
        r.job.end()
        return True

    def _step(self) -> None:
        """One decode: a token from each decoding sequence, prompt chunks with the room left."""
        batch = self._batch.batch
        batch.n_tokens = 0
        reads: list[Running] = []  # the sequences sampled from this step, in batch order
        decoding = [r for r in self._active if len(r.pending) == 1]
        prefilling = [r for r in self._active if len(r.pending) > 1]
        plan: list[tuple[Running, int]] = []  # who gets how many tokens: decoding ones first
        room = self.n_batch
        for r in decoding + prefilling:
            if room <= 0:
                break
            n = 1 if len(r.pending) == 1 else min(len(r.pending), self.prefill_chunk, room)
            plan.append((r, n))
            room -= n
        # In slot order: llama.cpp splits a batch into one pass over the weights per run of
        # consecutive sequence ids it meets in batch order (each slot is a KV stream of its own).
        plan.sort(key=lambda item: item[0].slot.seq_id)
        for r, n in plan:
            for token in r.pending[:n]:
                self._add(r.slot, token, logits=False)
            del r.pending[:n]
            if not r.pending:  # its last token is in: sample from it
                batch.logits[batch.n_tokens - 1] = True
                reads.append(r)
        self.ctx.decode(self._batch)
        self.steps += 1
        self.evaluated += batch.n_tokens
        self.widest = max(self.widest, len(reads))
        # The rows with logits, in batch order, read in one call (each call into llama.cpp hands
        # the GIL over) and copied before a sampler decodes anything.
        rows = self._all_logits(len(reads)).copy()
        for r, logits in zip(reads, rows):
            try:
                token = r.sampler.next(logits)
            except Exception as e:  # noqa: BLE001 - this sequence fails, the others go on
                self._clear(r.slot)
                r.job.end(e)
                token = None
            if token is None:
                self._active.remove(r)
            else:
                r.pending = [token]

    def _add(self, slot: Slot, token: int, logits: bool) -> None:
        batch = self._batch.batch
        j = batch.n_tokens
        batch.token[j] = token
        batch.pos[j] = len(slot.held)
        batch.n_seq_id[j] = 1
        batch.seq_id[j][0] = slot.seq_id
        batch.logits[j] = logits
        batch.n_tokens = j + 1
        slot.held.append(token)

    def _all_logits(self, n: int) -> np.ndarray:
        """The logits of the last decode's `n` rows that asked for them, in batch order."""
        pointer = llama_cpp.llama_get_logits(self.ctx.ctx)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                     shape=(n, self.n_vocab))

    def forced(self, prompt: list[int], tokens: list[int]) -> AnswerScores:
        """`tokens` scored teacher-forced after `prompt`, in the reserved slot (whose cache of a
        shared prefix is kept, so the labels of one prompt share its evaluation). Scheduler
        thread only; `tokens` not empty."""
        slot, sequence = self._scratch, prompt + tokens
        batch = self._batch.batch
        batch.n_tokens = 0
        parts: list[AnswerScores] = []
        targets: list[int] = []  # what each row with logits predicts: an index in `sequence`
        for at in range(self._reuse(slot, prompt), len(sequence) - 1):
            scored = at >= len(prompt) - 1
            self._add(slot, sequence[at], logits=scored)
            if scored:
                targets.append(at + 1)
            if batch.n_tokens == self.n_batch:
                parts += self._flush_forced(targets, sequence)
                targets = []
        parts += self._flush_forced(targets, sequence)
        return AnswerScores.join(parts)

    def _flush_forced(self, targets: list[int], sequence: list[int]) -> list[AnswerScores]:
        """Decode what `forced` put in the batch; the scores of its rows' `targets`."""
        batch = self._batch.batch
        if batch.n_tokens == 0:
            return []
        self.ctx.decode(self._batch)
        self.evaluated += batch.n_tokens
        batch.n_tokens = 0
        if not targets:
            return []
        rows = self._all_logits(len(targets))
        return [AnswerScores.of(rows, [sequence[t] for t in targets])]

    def _end_all(self) -> None:
        with self._wake:
            queued, calls = list(self._queue), list(self._calls)
            self._queue.clear()
            self._calls.clear()
        for r in self._active:
            r.job.end(EngineError(CLOSING))
        self._active = []
        for job in queued:
            job.end(EngineError(CLOSING))
        for _, future in calls:
            future.set_exception(EngineError(CLOSING))
