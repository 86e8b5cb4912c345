"""What the shadow store holds, and its row and JSON forms. Pure: no I/O, no clock.

`PairRecord`: a student answer and the teacher's answer to the same request. `ResponseRecord`:
every response id the gateway answered on a route with feedback (so feedback can find its route,
arm and version). `FeedbackRecord`: one piece of feedback on a response.

Owns what a record holds and how it is (de)serialised; does not own how the pair is produced
(the mirror), scored (`shadow.scoring`, whose `score_pair` dict goes into `scores`) or written
(`shadow.store`). `from_json(to_json(r)) == r` and `from_row(to_row(r)) == r` for every record.

A record is frozen, but `request`, `scores` and `teacher_logprobs` are plain JSON values
(dicts and lists) so they serialise as they are: treat them as read-only, and use
`with_scores` to attach scores. Numbers must be finite (JSON has no NaN or infinity, and
neither has PostgreSQL's jsonb): clamp a `-inf` logprob to a floor such as -9999.0 first.

Text from outside (prompts, upstream answers) may hold what no store can keep: `clean_json`
replaces lone surrogates (not UTF-8) and NUL (PostgreSQL text cannot hold it) with U+FFFD.

`created_at` is an ISO 8601 UTC timestamp chosen by the caller, always in one format (the store
filters on it as text), e.g. `2026-11-28T21:43:08.123456+00:00`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
SCHEMA_VERSION = 1  # bump when a field changes meaning; `from_dict` refuses newer records

# The columns a store keeps beside the full JSON record, to filter and index on.
ROW_COLUMNS = (
    "pair_id", "route", "variant", "student_version", "teacher", "created_at", "disagreement",
    "record",
)

TopLogprob = dict[str, Any]  # {"token": str, "logprob": float, "top": [[token, logprob], ...]}


@dataclass(frozen=True)
class Answer:
    """One side of a pair: what a model answered and how fast."""

    model: str  # model name as served (a remote target: the remote model name)
    version: str | None  # model version from the registry; None when unknown (a cloud model)
    text: str  # the answer's text (first choice)
    finish_reason: str | None  # "stop", "length", ...; None when the call did not finish
    prompt_tokens: int | None  # from the usage block; None when the backend gave none
    completion_tokens: int | None
    ttft_ms: float | None  # request to first token; None when no token came
    latency_ms: float  # request to last byte


@dataclass(frozen=True)
class PairRecord:
    """A student answer and the teacher's answer to the same (redacted) request."""

    pair_id: str  # the response id the client saw; the store's primary key
    request_id: str  # the gateway's request id (logs, traces)
    route: str
    variant: str  # the A/B arm that answered the user
    target: str  # the shadow target: a local variant or a remote endpoint's name
    request: dict[str, Any]  # after redaction: messages or prompt, plus sampling parameters
    student: Answer
    teacher: Answer
    created_at: str  # ISO 8601 UTC, see the module doc
    teacher_logprobs: list[TopLogprob] | None = None  # per generated token, when provided
    scores: dict[str, float | None] = field(default_factory=dict)  # `score_pair`; {} unscored
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name in ("pair_id", "request_id", "route", "variant", "target", "created_at"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"PairRecord.{name} must be a non-empty string, got {value!r}")
        _check_finite(self.scores, "scores")
        _check_finite(self.teacher_logprobs, "teacher_logprobs")
        for side in ("student", "teacher"):
            answer = getattr(self, side)
            _check_finite([answer.ttft_ms, answer.latency_ms], f"{side} latencies")

    @property
    def disagreement(self) -> float | None:
        """The combined disagreement in [0, 1]; None until the pair is scored."""
        return self.scores.get("disagreement")

    def with_scores(self, scores: Mapping[str, float | None]) -> PairRecord:
        return dataclasses.replace(self, scores=dict(scores))

    # --- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields, the answers as dicts; nested values are the record's own, not copies
        (`dataclasses.asdict` deep-copies every logprob list: a cost on each stored pair)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for side in ("student", "teacher"):
            out[side] = {f.name: getattr(out[side], f.name) for f in dataclasses.fields(Answer)}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairRecord:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"pair record {data.get('pair_id')!r} has schema_version {version!r}; this "
                f"protege reads {SCHEMA_VERSION}: upgrade protege to read newer records"
            )
        _check_keys(data, {f.name for f in dataclasses.fields(cls)}, "pair record")
        sides = {}
        for side in ("student", "teacher"):
            _check_keys(data[side], {f.name for f in dataclasses.fields(Answer)}, side)
            sides[side] = Answer(**data[side])
        return cls(**{**data, **sides})

    def to_json(self) -> str:
        """One line of compact JSON (no newline inside: it is also the spill file's format)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> PairRecord:
        return cls.from_dict(json.loads(text))

    def to_row(self) -> dict[str, Any]:
        """The store's row: the filterable columns of `ROW_COLUMNS` and the whole record as JSON."""
        return {
            "pair_id": self.pair_id,
            "route": self.route,
            "variant": self.variant,
            "student_version": self.student.version,
            "teacher": self.teacher.model,
            "created_at": self.created_at,
            "disagreement": self.disagreement,
            "record": self.to_json(),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PairRecord:
        """The record back from a row; only the `record` column is read (it holds everything)."""
        return cls.from_json(row["record"])


def clean_text(text: str) -> str:
    """`text` with lone surrogates and NUL replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def unstorable(text: str) -> str | None:
    """What no store can keep in `text` (for a 400 on what a client sent), or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return ("a NUL character" if found.group() == "\x00"
            else f"a lone surrogate (U+{ord(found.group()):04X}), which is not UTF-8")


def clean_json(value: Any) -> Any:
    """Every str in nested dicts/lists (keys too) through `clean_text`, as new objects."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: clean_json(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def _check_keys(data: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{what} has unknown fields {sorted(unknown)}: upgrade protege, or "
                         "bump SCHEMA_VERSION when adding fields")


def _check_finite(value: Any, where: str) -> None:
    """Raise when a float anywhere in `value` (nested lists and dicts) is NaN or infinite."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"PairRecord {where} holds {item}: JSON cannot store it; clamp "
                                 "logprobs to a finite floor (e.g. -9999.0) and drop NaN scores")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


# --- responses and feedback --------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseRecord:
    """A response the gateway answered: what feedback on its id is aggregated by."""

    response_id: str
    route: str
    variant: str  # the A/B arm that answered
    version: str
    created_at: str  # ISO 8601 UTC, see the module doc

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ResponseRecord.{f.name} must be a non-empty string, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class FeedbackRecord:
    """One piece of feedback: a boolean (1.0/0.0) or float `value`, or a text `comment`."""

    feedback_id: str
    response: ResponseRecord  # the response it is about
    metric: str
    value: float | None
    comment: str | None
    created_at: str

    def __post_init__(self) -> None:
        if (self.value is None) == (self.comment is None):
            raise ValueError("FeedbackRecord needs exactly one of value or comment")
        _check_finite(self.value, "feedback value")


def spill_line(item: PairRecord | ResponseRecord) -> str:
    """One line of the writer's spill file (no newline): a pair, or a tagged response."""
    if isinstance(item, ResponseRecord):
        return json.dumps({"kind": "response", **dataclasses.asdict(item)},
                          ensure_ascii=False, separators=(",", ":"))
    return item.to_json()


def from_spill_line(line: str) -> PairRecord | ResponseRecord:
    data = json.loads(line)
    if isinstance(data, dict) and data.get("kind") == "response":
        del data["kind"]
        _check_keys(data, {f.name for f in dataclasses.fields(ResponseRecord)}, "response record")
        return ResponseRecord(**data)
    return PairRecord.from_dict(data)
