"""The two interfaces a shadow store implements: `PairStore` (what the writer, feedback, export
and the loop need) and `ReviewStore` (what the review page and labelling need). Methods block:
call them from a thread (`asyncio.to_thread`), never on the event loop."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from shadow.labels import Label
from shadow.records import FeedbackRecord, PairRecord, ResponseRecord
from shadow.review_queries import ReviewQuery

Record = PairRecord | ResponseRecord  # what a writer batches


class PairStore(Protocol):
    """What `PairWriter`, feedback and the ML team's tools need from a store. Methods block:
    call them from a thread (`asyncio.to_thread`), never on the event loop."""

    def write_batch(self, records: Sequence[Record]) -> None:
        """Write all records in one transaction, or none; an id already stored is skipped."""

    def count(self) -> int: ...

    def get(self, pair_id: str) -> PairRecord | None: ...

    def iter_pairs(
        self, *, route: str | None = None, since: str | None = None, until: str | None = None,
        min_disagreement: float | None = None, limit: int | None = None,
    ) -> Iterator[PairRecord]:
        """Pairs oldest first (`created_at`, then `pair_id`); `since` inclusive, `until` not."""

    def existing(self, pair_ids: Sequence[str]) -> set[str]:
        """Which of `pair_ids` are stored."""

    def get_response(self, response_id: str) -> ResponseRecord | None: ...

    def add_feedback(self, feedback: FeedbackRecord) -> None:
        """Store one piece of feedback (several per response and metric are kept)."""

    def iter_feedback(self, *, since: str | None = None) -> Iterator[FeedbackRecord]:
        """Feedback oldest first."""

    def iter_labels(self) -> Iterator[Label]:
        """Every label, oldest first (so the last one seen per pair is its current label)."""


class ReviewStore(Protocol):
    """What the review page and the labelling tools read and write: a pair's feedback and labels,
    the filtered list, its summary and facets. Both backends implement it beside `PairStore`."""

    def feedback_for(self, response_id: str) -> list[FeedbackRecord]:
        """The feedback on one response (a pair's id is its response's), oldest first."""

    def add_label(self, label: Label) -> bool:
        """Store a reviewer's label; False (nothing stored) when the pair does not exist."""

    def labels_for(self, pair_id: str) -> list[Label]:
        """A pair's labels, newest first."""

    def review_page(self, query: ReviewQuery) -> dict:
        """The review page's list: `{"total", "page", "size", "sort", "items"}`."""

    def review_summary(self, query: ReviewQuery) -> dict:
        """The review page's summary panel over the filtered pairs
        (`shadow.review_queries.summary`)."""

    def review_facets(self) -> dict:
        """The routes, student versions and feedback metrics the store holds."""
