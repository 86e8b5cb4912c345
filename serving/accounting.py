"""One generation request's accounting, as a pure accumulator: the deltas it sees (with the
time each arrived), the version that served it, and what the ingress reports once it ends.

No clock, metrics, logs or I/O here: the ingress passes the times in and turns `RequestTally`'s
numbers into metrics, the canonical log line, the feedback row and the mirrored pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from serving.engines.base import Delta
from serving.engines.structured import ResponseFormat, check_answer


@dataclass
class RequestTally:
    started: float  # when the request arrived (monotonic seconds)
    version: str  # the configured version until the replica says which served
    keep_text: bool = False  # keep each choice's text (mirrored, logged or format-checked)
    first_token_at: float | None = None
    last_token_at: dict[int, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: dict[int, int] = field(default_factory=dict)
    answers: dict[int, str] = field(default_factory=dict)  # each choice's text, if kept
    finish_reasons: dict[int, str] = field(default_factory=dict)  # choice index -> why it ended

    def served_by(self, versions: Iterable[str | None]) -> str:
        """The model version the replica reported on the first deltas (after a promotion it
        differs from the configured one)."""
        self.version = next((v for v in versions if v), self.version)
        return self.version

    def add(self, index: int, delta: Delta, now: float) -> float | None:
        """Count one streamed delta of choice `index`; returns the time since that choice's
        previous token (an inter-token gap), None when there is none."""
        gap = None
        if delta.text or delta.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
            elif index in self.last_token_at:
                gap = now - self.last_token_at[index]
            self.last_token_at[index] = now
            if self.keep_text:
                self.answers[index] = self.answers.get(index, "") + delta.text
        if delta.finish_reason is not None:
            self.finish_reasons[index] = delta.finish_reason
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if delta.completion_tokens is not None:
            self.completion_tokens[index] = delta.completion_tokens
        return gap

    def add_whole(self, choices: list[Delta], now: float) -> None:
        """Count a non-streamed answer: every choice arrived whole at `now`."""
        self.first_token_at = now
        for index, c in enumerate(choices):
            self.add(index, Delta(c.text, (), None, c.finish_reason, c.prompt_tokens,
                                  c.completion_tokens), now)

    def ttft(self, status: int) -> float | None:
        """Seconds to the first token of an answered request."""
        if self.first_token_at is None or status != 200:
            return None
        return self.first_token_at - self.started

    @property
    def completion_total(self) -> int:
        return sum(self.completion_tokens.values())

    def format_outcomes(self, fmt: ResponseFormat) -> dict[int, str]:
        """Each finished choice against `fmt`: `valid`, `invalid` or `truncated` (cut by
        max_tokens)."""
        return {index: "truncated" if reason == "length" else
                "valid" if check_answer(fmt, self.answers.get(index, "")) is None else "invalid"
                for index, reason in sorted(self.finish_reasons.items())}
