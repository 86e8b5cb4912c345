"""The bridge for engines whose model runs on a thread of its own (llama.cpp, transformers).

`TokenLoopEngine` is what they share. A generation becomes a `Job` (prompt tokens, sampling,
budget, a stop event, where deltas go) handed to the model's thread (`_submit`); its token loop
gives each sampled token to a `TokenOutput`, which cuts the answer (end tokens, stop strings, a
complete grammar, the budget) and emits the deltas; `Job.end` closes the stream. Closing a
generation's iterator sets its stop event, which the token loop checks at every token. Deltas
reach the event loop through a `LoopMail`, which wakes the loop once per burst. The
chat template, `score` (an answer teacher-forced, for callers such as the release gate) and
`label_probs` (a label-constrained answer asked with logprobs: each label's sequence logprob
after the prompt, softmaxed over the labels) are written once here.

`WorkerThreadEngine` decodes on one worker thread, `n_parallel` generations together in one
batch that runs until its last one ends; the generations that come meanwhile wait for the next
(transformers). llama.cpp batches its sequences on a scheduler thread of its own
(`serving.engines.llama_batch`).
"""

from __future__ import annotations

import abc
import asyncio
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from serving.engines.base import (
    AnswerScores,
    Delta,
    Engine,
    EngineError,
    GenerationRequest,
    Message,
    PromptTooLong,
    SamplingParams,
    StopMatcher,
    TokenLogprob,
)
from serving.engines.tools import prompt_messages, renders_tools

_DONE = object()
CLOSING = "generation aborted: the engine is closing"
_T = TypeVar("_T")


@dataclass(slots=True)
class Job:
    """One generation on the model's thread: its prompt, sampling, completion-token budget, the
    event that aborts it and where its deltas go."""

    prompt: list[int]
    params: SamplingParams
    budget: int
    stop: threading.Event
    emit: Callable[[object], None]
    ended: bool = False

    def end(self, error: Exception | None = None) -> None:
        """No more deltas: the stream ends, raising `error` when one is given."""
        if error is not None:
            self.emit(error)
        self.emit(_DONE)
        self.ended = True


class LoopMail:
    """Items from the model's thread to asyncio queues of one event loop. The loop is woken once
    per burst, not once per item: a step that samples n sequences costs one wake-up. (Each
    wake-up is a system call that hands the GIL over, and getting it back can wait up to the
    interpreter's switch interval while the loop thread runs Python.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: object) -> None:
        """`item` into `queue` on the loop; RuntimeError once the loop is closed."""
        with self._lock:
            if self.loop.is_closed():  # a wake-up still on its way would never come
                raise RuntimeError("the event loop is closed")
            self._items.append((queue, item))
            if len(self._items) > 1:  # a wake-up is on its way and will take this one too
                return
        self.loop.call_soon_threadsafe(self._deliver)  # RuntimeError if it has just closed

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class Grammar(Protocol):
    done: bool  # the grammar accepts nothing more: the answer is complete


class TokenOutput:
    """A generation's output: each sampled token becomes a delta, cut at an end-of-generation
    token, a stop string, a complete grammar or the budget; `close` emits the last delta with the
    finish reason and counts."""

    def __init__(self, job: Job, text_of: Callable[[int], str], rest: Callable[[], str],
                 grammar: Grammar | None = None):
        self.job, self.text_of, self.rest, self.grammar = job, text_of, rest, grammar
        self.matcher = StopMatcher(job.params.stop)
        self.n, self.finish, self.hit = 0, "length", False

    def push(self, token: int, logprob: TokenLogprob | None, end: bool) -> bool:
        """Emit `token` (`end`: it ends the generation, no text); True when the answer is over."""
        self.n += 1
        logprobs = None if logprob is None else (logprob,)
        if end:
            self.finish = "stop"
            self.job.emit(Delta("", (token,), logprobs))
            return True
        text, self.hit = self.matcher.push(self.text_of(token))
        self.job.emit(Delta(text, (token,), logprobs))
        if self.hit or (self.grammar is not None and self.grammar.done):
            self.finish = "stop"
            return True
        return self.n >= self.job.budget

    def close(self, label_probs: dict[str, float] | None) -> None:
        """The last delta: text held back (partial characters, a partial stop string) unless a
        stop string cut the answer, the finish reason and the counts."""
        tail = ""
        if not self.hit:
            tail, self.hit = self.matcher.push(self.rest())
            tail += "" if self.hit else self.matcher.flush()
        self.job.emit(Delta(tail, finish_reason=self.finish, prompt_tokens=len(self.job.prompt),
                            completion_tokens=self.n, label_probs=label_probs))


class TokenLoopEngine(Engine):
    def __init__(self, name: str):
        self._name = name
        self._running: set[threading.Event] = set()  # stop events of queued and running work
        self._mail: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> LoopMail

    @abc.abstractmethod
    def _submit(self, job: Job) -> None:
        """Hand `job` to the model's thread, which runs its token loop and then calls `job.end`
        (with an error when it failed, or with `EngineError(CLOSING)` when `close` stopped it)."""

    @abc.abstractmethod
    async def _in_worker(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the model's thread (loading, scoring), between token steps."""

    def tokenize_request(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: chat messages rendered with the model's own chat template
        (with the request's tools, `serving.engines.tools`), or the completion prompt."""
        if not self._loaded():
            raise EngineError(f"{self._name} engine: call start() before generate()")
        if request.messages is not None:
            template = self._chat_template()
            if not template:
                raise EngineError(f"{self.info.model} has no chat template "
                                  "(tokenizer.chat_template); use completions with a prompt")
            messages, tools = prompt_messages(request.messages, request.tools,
                                              renders_tools(template))
            return self._chat_tokens(messages, tools)
        if request.prompt is None:
            raise ValueError("GenerationRequest needs `messages` or `prompt`")
        return self._prompt_tokens(request.prompt)

    @abc.abstractmethod
    def _loaded(self) -> bool:
        """The model is loaded (`start` ran)."""

    @abc.abstractmethod
    def _chat_template(self) -> str | None:
        """The model's chat template (Jinja); None when it has none."""

    @abc.abstractmethod
    def _chat_tokens(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """Chat `messages` (and `tools`, as `prompt_messages` gives them) rendered with the
        template, with the generation prompt, tokenized."""

    @abc.abstractmethod
    def _prompt_tokens(self, prompt: str) -> list[int]:
        """A completion prompt tokenized as the model expects it (BOS where it uses one)."""

    @abc.abstractmethod
    def _text_tokens(self, text: str) -> list[int]:
        """`text` tokenized on its own: no BOS, special-token text kept as text."""

    @abc.abstractmethod
    def _end_token(self) -> int | None:
        """The end-of-sequence token a finished answer ends with; None when the model has none."""

    @abc.abstractmethod
    def _score_tokens(self, prompt: list[int], tokens: list[int]) -> AnswerScores:
        """`tokens` scored teacher-forced after `prompt` (worker thread; `tokens` not empty)."""

    async def score(self, messages: Sequence[Message], answer: str, *,
                    end: bool = False) -> AnswerScores:
        prompt = self.tokenize_request(GenerationRequest(
            "score", SamplingParams(max_tokens=0), messages=tuple(messages)))
        tokens = self._text_tokens(answer)
        eos = self._end_token() if end else None
        tokens += [] if eos is None else [eos]
        window = self.info.context_window
        if window is not None and len(prompt) + len(tokens) > window:
            raise PromptTooLong(len(prompt), len(tokens), window)
        if not tokens:
            return AnswerScores.join([])
        return await self._in_worker(lambda: self._score_tokens(prompt, tokens))

    def _label_probs(self, prompt: list[int], p: SamplingParams) -> dict[str, float] | None:
        """P(label | prompt) over a label-constrained answer's labels when logprobs are asked
        for (worker thread); None otherwise."""
        fmt = p.response_format
        if fmt is None or fmt.type != "choice" or p.logprobs is None:
            return None
        scores = np.array([self._score_tokens(prompt, self._text_tokens(label)).total
                           for label in fmt.labels])
        probs = np.exp(scores - scores.max())
        return dict(zip(fmt.labels, (probs / probs.sum()).tolist(), strict=True))

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        tokens = self.tokenize_request(request)
        budget = self.budget(len(tokens), request.params.max_tokens)
        return self._stream(tokens, request.params, budget)

    async def _stream(
        self, tokens: list[int], params: SamplingParams, budget: int
    ) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        mail = self._mail.get(loop) or self._mail.setdefault(loop, LoopMail(loop))
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(item: object) -> None:
            try:
                mail.put(queue, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        self._running.add(stop)
        self._submit(Job(tokens, params, budget, stop, emit))
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, Exception):
                    raise EngineError(f"{self._name} generation failed: {item}") from item
                yield item
        finally:
            stop.set()
            self._running.discard(stop)

    def _stop_all(self) -> None:
        """Set the stop event of every queued and running generation."""
        for stop in list(self._running):
            stop.set()


class WorkerThreadEngine(TokenLoopEngine):
    """Generations decoded on one worker thread, up to `n_parallel` in one batch: a batch takes
    the generations waiting when it starts and runs until the last of them ends."""

    def __init__(self, name: str, n_parallel: int = 1):
        super().__init__(name)
        self.n_parallel = n_parallel
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._waiting: deque[Job] = deque()

    async def _in_worker(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the worker thread, after the work queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    @abc.abstractmethod
    def _decode(self, jobs: list[Job]) -> None:
        """The token loop of `jobs`, decoded together (worker thread). Each job ends once
        (`Job.end`): after its last delta, or with `EngineError(CLOSING)` when its stop event
        ended it early (unheard when the consumer left; else `close` stopped it)."""

    def _submit(self, job: Job) -> None:
        self._waiting.append(job)
        self._pool.submit(self._next_batch)

    def _next_batch(self) -> None:
        jobs = []
        while self._waiting and len(jobs) < self.n_parallel:
            job = self._waiting.popleft()
            if job.stop.is_set():
                job.end(EngineError(CLOSING))
            else:
                jobs.append(job)
        if not jobs:
            return
        try:
            self._decode(jobs)
        except Exception as e:  # noqa: BLE001 - handed to the consumers
            for job in jobs:
                if not job.ended:
                    job.end(e)

    async def _stop_worker(self) -> None:
        """Stop running and queued generations and wait for the worker thread to finish."""
        self._stop_all()
        await asyncio.to_thread(self._pool.shutdown, wait=True)  # queued work sees its stop
