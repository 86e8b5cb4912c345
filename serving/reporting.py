"""Reporting one generation request once it ends: its metrics, the canonical log line, and for
an answer its feedback row and, when sampled, its mirrored pair. `Call` is the request as the
ingress sees it; its numbers accumulate in a pure `RequestTally` (`serving.accounting`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from core.metrics import GatewayMetrics
from serving.accounting import RequestTally
from serving.engines.base import Delta, GenerationRequest
from serving.engines.structured import ResponseFormat
from serving.outbox import ShadowOutbox
from serving.router import Arm, RouteTarget, ShadowPlan
from shadow.mirror import MirrorJob
from shadow.records import Answer, ResponseRecord


@dataclass
class Call:
    """One generation request as the ingress reports it."""

    t: RouteTarget
    arm: Arm
    arm_key: str  # what picked the arm: "user", "session" or "request"
    request_id: str
    stream: bool
    format: ResponseFormat | None  # what the answers must be; each is checked at the end
    tally: RequestTally
    mirror: tuple[ShadowPlan, GenerationRequest] | None = None  # sampled for shadowing
    prompt: object = None  # the prompt as logged, with log_prompts only
    created_at: str = ""  # when the request arrived (ISO 8601 UTC), set only when mirrored
    format_valid: bool = True
    done: bool = False
    labels: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.labels = {"route": self.t.route, "variant": self.arm.variant}



class CallReporter:
    """Turns a finished `Call` into metrics, a log line, a feedback row and a mirrored pair.
    No failure here fails the user's answer."""

    def __init__(self, metrics: GatewayMetrics, log, outbox: ShadowOutbox | None,
                 feedback: bool):
        self.metrics, self.log, self.outbox, self.feedback = metrics, log, outbox, feedback

    def delta(self, call: Call, index: int, delta: Delta) -> None:
        gap = call.tally.add(index, delta, time.monotonic())
        if gap is not None:
            self.metrics.inter_token.labels(**call.labels).observe(gap)

    def finish(self, call: Call, status: int, choices: list[Delta] | None = None) -> None:
        """Report a request once: metrics, the canonical log line, and for an answer its
        feedback row and mirrored pair. No failure here fails the answer."""
        if call.done:
            return
        call.done = True
        now, tally = time.monotonic(), call.tally
        m, labels = self.metrics, call.labels
        stream = "true" if call.stream else "false"
        if choices is not None:
            tally.add_whole(choices, now)
        m.in_flight.labels(**labels).dec()
        m.requests.labels(**labels, status=str(status)).inc()
        m.latency.labels(**labels, stream=stream).observe(now - tally.started)
        ttft = tally.ttft(status)
        if ttft is not None:
            m.ttft.labels(**labels, stream=stream).observe(ttft)
        completion = tally.completion_total
        if tally.prompt_tokens:
            m.tokens.labels(**labels, kind="prompt").inc(tally.prompt_tokens)
        if completion:
            m.tokens.labels(**labels, kind="completion").inc(completion)
        if call.format is not None and status == 200:
            for index, outcome in tally.format_outcomes(call.format).items():
                if outcome == "invalid":  # the reason may quote the answer: not logged
                    self.log.warning("serving.format.invalid", request_id=call.request_id,
                                     choice=index)
                call.format_valid = call.format_valid and outcome == "valid"
                m.structured.labels(**labels, outcome=outcome).inc()
        try:  # the log line and the shadow's bookkeeping: no failure here fails the answer
            self.log.info(
                "serving.request.completed", request_id=call.request_id, route=call.t.route,
                variant=call.arm.variant, version=tally.version, arm_key=call.arm_key,
                status=status, stream=call.stream,
                latency_ms=round((now - tally.started) * 1000, 2),
                ttft_ms=round(ttft * 1000, 2) if ttft is not None else None,
                prompt_tokens=tally.prompt_tokens, completion_tokens=completion,
                **({"prompt": call.prompt, "answers": tally.answers}
                   if call.prompt is not None else {}),
            )
            if status == 200 and self.feedback and self.outbox is not None:
                self.outbox.response(ResponseRecord(
                    call.request_id, call.t.route, call.arm.variant, tally.version,
                    call.created_at or datetime.now(UTC).isoformat()))
            if call.mirror is not None and status == 200:
                plan, request = call.mirror
                student = Answer(
                    model=call.arm.variant, version=tally.version,
                    text=tally.answers.get(0, ""), finish_reason=tally.finish_reasons.get(0),
                    prompt_tokens=tally.prompt_tokens,
                    completion_tokens=tally.completion_tokens.get(0),
                    ttft_ms=round(ttft * 1000, 3) if ttft is not None else None,
                    latency_ms=round((now - tally.started) * 1000, 3),
                )
                self.outbox.mirror(MirrorJob(
                    pair_id=call.request_id, route=call.t.route, variant=call.arm.variant,
                    target=plan.target, request=request, stream=call.stream, student=student,
                    created_at=call.created_at, store_prompt=plan.store_prompt,
                    labels=plan.labels,
                ))
        except Exception as e:  # noqa: BLE001 - counted; the user has the answer
            self.log.warning("shadow.bookkeeping.failed", request_id=call.request_id,
                             error=repr(e)[:300])
            if call.mirror is not None and status == 200:
                m.shadow_dropped.labels(kind="pair", reason="handoff_failed").inc()
