"""A mirrored request and how its teacher answer becomes a scored pair record.

The gateway answers the user first; then, for a sampled request, it hands a `MirrorJob` (the
request, the student's answer and timings) to the shadow worker. The worker calls the teacher
in the same streaming mode, times it, scores the two answers and offers the record to the pair
writer. This module holds the pieces that need no Ray and no network: the job, timing a
teacher's delta stream, and building the record.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace

from serving.engines.base import Delta, GenerationRequest, Message, TokenLogprob, merge_deltas
from shadow.records import Answer, PairRecord, clean_json, clean_text

MARKER_HEADER = "x-protege-shadow"  # sent to remote teachers: this request is a mirror
LOGPROB_FLOOR = -9999.0  # JSON has no -inf


@dataclass(frozen=True)
class MirrorJob:
    pair_id: str  # the response id the client saw
    route: str
    variant: str  # the arm that answered the user
    target: str  # the teacher: a variant name or "remote:<model>"
    request: GenerationRequest  # the first choice of what the user asked
    stream: bool  # the teacher is called the same way, so TTFT compares
    student: Answer
    created_at: str  # ISO 8601 UTC, when the user's request arrived
    store_prompt: bool = True  # False: the pair keeps no prompt text
    labels: tuple[str, ...] = ()  # a classification route's label set


def teacher_key(job: MirrorJob) -> str:
    """The teacher a job waits on, for budgets and concurrency: a local variant (shared by the
    routes that mirror to it) or a route's own remote endpoint."""
    return job.route if job.target.startswith("remote:") else job.target


def request_dict(request: GenerationRequest) -> dict:
    """The request as stored with the pair: messages (with their tool calls) or prompt, the
    tools it offered, and the sampling parameters."""
    out: dict = {"params": asdict(request.params)}
    fmt = request.params.response_format
    out["params"]["response_format"] = None if fmt is None else fmt.stored()
    if request.messages is not None:
        out["messages"] = [_message(m) for m in request.messages]
        if request.tools is not None:  # as the client sent them
            out["tools"] = request.tools.openai()
    else:
        out["prompt"] = request.prompt
    out["params"]["stop"] = list(request.params.stop)
    return out


def _message(m: Message) -> dict:
    out: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [c.openai() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


async def timed_answer(
    deltas: AsyncIterator[Delta], model: str, version: str | None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Answer, list[dict] | None]:
    """Drain a teacher's deltas; its answer with TTFT and latency (ms), and its logprobs."""
    started, first = clock(), None
    seen: list[Delta] = []
    async for delta in deltas:
        if first is None and (delta.text or delta.token_ids):
            first = clock()
        seen.append(delta)
    return answer_from(seen, started, first, clock(), model, version)


def answer_from(deltas: list[Delta], started: float, first: float | None, done: float,
                model: str, version: str | None) -> tuple[Answer, list[dict] | None]:
    """A teacher's answer from its deltas and the times of the call's start, its first token
    and its end (seconds); and its logprobs as stored."""
    whole = merge_deltas(deltas)
    answer = Answer(
        model=model, version=version, text=whole.text, finish_reason=whole.finish_reason,
        prompt_tokens=whole.prompt_tokens, completion_tokens=whole.completion_tokens,
        ttft_ms=round((first - started) * 1000, 3) if first is not None else None,
        latency_ms=round((done - started) * 1000, 3),
    )
    return answer, _logprobs(whole.logprobs)


def _logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> list[dict] | None:
    if logprobs is None:
        return None

    def floor(x: float) -> float:
        return x if x > LOGPROB_FLOOR else LOGPROB_FLOOR

    return [{"token": t.token, "logprob": floor(t.logprob),
             "top": [[tok, floor(lp)] for tok, lp in t.top]} for t in logprobs]


def make_record(job: MirrorJob, teacher: Answer, logprobs: list[dict] | None,
                scores: dict[str, float | None], redactor=None) -> tuple[PairRecord, dict]:
    """The pair as stored, and what `redactor` (a `shadow.redact.Redactor`) replaced by kind.

    The prompt (when the route stores it), both answers and the teacher's logprobs (cut before
    the first redacted span, `Redactor.redact_logprobs`) are redacted; scores were computed on
    the original text by then. Without `store_prompt` only the parameters are kept. Text no
    store can hold (lone surrogates, NUL) is replaced first (`clean_json`)."""
    request = clean_json(request_dict(job.request))
    if not job.store_prompt:
        request = {"params": request["params"]}
    logprobs = clean_json(logprobs)
    student, counts = replace(job.student, text=clean_text(job.student.text)), {}
    teacher = replace(teacher, text=clean_text(teacher.text))
    if redactor is not None:
        request, counts = redactor.redact_json(request)
        student, redacted = (_redacted(a, redactor, counts) for a in (student, teacher))
        logprobs, found = redactor.redact_logprobs(teacher.text, redacted.text, logprobs)
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
        teacher = redacted
    record = PairRecord(
        pair_id=job.pair_id, request_id=job.pair_id, route=job.route, variant=job.variant,
        target=job.target, request=request, student=student, teacher=teacher,
        created_at=job.created_at, teacher_logprobs=logprobs, scores=scores,
    )
    return record, counts


def _redacted(answer: Answer, redactor, counts: dict[str, int]) -> Answer:
    text, found = redactor.redact(answer.text)
    for kind, n in found.items():
        counts[kind] = counts.get(kind, 0) + n
    return replace(answer, text=text) if found else answer
