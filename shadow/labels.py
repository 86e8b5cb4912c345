"""Reviewers' labels on pairs, and what a label does to the pair's training example. Pure.

A reviewer says which answer is better (`VERDICTS`) and may write a corrected answer. Labels are
history: a pair may be labelled several times, and the latest label counts. `parse_label` checks
a label posted by the review page; `target_of` picks the example's assistant turn:

  a corrected answer          the corrected answer (whatever the verdict)
  teacher, both_fine          the teacher's answer
  both_wrong (no correction)  none: the pair is left out
  student                     `StudentBetter`: drop the pair (default), keep the teacher's
                              answer, or train on the student's answer
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shadow.records import unstorable

VERDICTS = ("student", "teacher", "both_fine", "both_wrong")
MAX_REVIEWER = 100
MAX_CORRECTED = 100_000


class StudentBetter(StrEnum):
    """What an export does with pairs a reviewer found the student better on."""

    drop = "drop"
    keep = "keep"  # the teacher's answer stays the target
    student = "student"  # the student's answer becomes the target


@dataclass(frozen=True)
class Label:
    """One reviewer's verdict on one pair, at one time."""

    label_id: str
    pair_id: str
    verdict: str  # one of VERDICTS
    corrected: str | None  # a corrected answer; None when the reviewer wrote none
    reviewer: str
    created_at: str  # ISO 8601 UTC, the format of `shadow.records`

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} (allowed: {', '.join(VERDICTS)})")

    def public(self) -> dict[str, Any]:
        """What the review page shows of a label."""
        return {"verdict": self.verdict, "corrected": self.corrected, "reviewer": self.reviewer,
                "created_at": self.created_at}


class LabelError(ValueError):
    """A posted label that cannot be stored; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def parse_label(body: Any, pair_id: str, now: str, redactor=None) -> Label:
    """A `Label` from the review page's JSON body `{"verdict", "corrected", "reviewer"}`; the
    corrected answer passes `redactor` (a `shadow.redact.Redactor`) when one is given."""
    if not isinstance(body, Mapping):
        raise LabelError("the body must be a JSON object", "body")
    verdict = body.get("verdict")
    if verdict not in VERDICTS:
        raise LabelError(f"verdict must be one of {', '.join(VERDICTS)}", "verdict")
    reviewer = body.get("reviewer")
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise LabelError("reviewer: the reviewer's name is required", "reviewer")
    reviewer = reviewer.strip()
    if problem := unstorable(reviewer):
        raise LabelError(f"reviewer must not contain {problem}", "reviewer")
    if len(reviewer) > MAX_REVIEWER:
        raise LabelError(f"reviewer: at most {MAX_REVIEWER} characters", "reviewer")
    corrected = body.get("corrected")
    if corrected is not None and not isinstance(corrected, str):
        raise LabelError("corrected must be a string or null", "corrected")
    if corrected is not None and len(corrected) > MAX_CORRECTED:
        raise LabelError(f"corrected: at most {MAX_CORRECTED} characters", "corrected")
    if corrected is not None and (problem := unstorable(corrected)):
        raise LabelError(f"corrected must not contain {problem}", "corrected")
    corrected = corrected if corrected and corrected.strip() else None
    if corrected is not None and redactor is not None:
        corrected, _ = redactor.redact(corrected)
    return Label(f"lbl-{uuid.uuid4().hex}", pair_id, verdict, corrected, reviewer, now)


def latest(labels: Iterable[Label]) -> dict[str, Label]:
    """Each pair's current label, from labels oldest first (`PairStore.iter_labels`)."""
    return {label.pair_id: label for label in labels}


def target_of(label: Label | None, teacher: str | None, student: str | None,
              student_better: StudentBetter = StudentBetter.drop) -> tuple[str | None, str] | None:
    """The assistant turn for a pair and where it came from (`teacher`, `corrected`,
    `student`); None when the label leaves the pair out. `teacher`/`student` are None when
    that answer cannot be a target (empty, unfinished): the turn is then None too."""
    if label is None:
        return teacher, "teacher"
    if label.corrected is not None:
        return label.corrected, "corrected"
    if label.verdict == "both_wrong":
        return None
    if label.verdict == "student":
        if student_better is StudentBetter.drop:
            return None
        if student_better is StudentBetter.student:
            return student, "student"
    return teacher, "teacher"
