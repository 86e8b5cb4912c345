"""SQL both backends share: the column lists, the pairs query, label inserts, feedback rows,
and `ReviewReads`, the review page's queries for a store that runs SQL in a `Dialect`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from shadow.labels import VERDICTS, Label
from shadow.records import FeedbackRecord, PairRecord, ResponseRecord
from shadow.review_queries import (
    Dialect,
    ReviewQuery,
    bucket_length,
    list_item,
    page_sql,
    summary,
    summary_sql,
    where_sql,
)
from shadow.store.base import Record

RESPONSE_COLUMNS = ("response_id", "route", "variant", "version", "created_at")
FEEDBACK_COLUMNS = ("feedback_id", "response_id", "route", "variant", "version", "metric",
                    "value", "comment", "created_at")
def split_batch(records: Sequence[Record]) -> tuple[list[dict], list[dict]]:
    """Rows for the pairs table and for the responses table (serialised before any lock)."""
    pairs, responses = [], []
    for r in records:
        if isinstance(r, ResponseRecord):
            responses.append(dataclasses.asdict(r))
        else:
            pairs.append(r.to_row())
    return pairs, responses


def pairs_query(mark: str, *, route: str | None, since: str | None, until: str | None,
                min_disagreement: float | None, limit: int | None) -> tuple[str, list]:
    """`PairStore.iter_pairs` as SQL and its parameters; `mark` is the driver's placeholder."""
    where, params = [], []
    for clause, value in (("route = ", route), ("created_at >= ", since),
                          ("created_at < ", until), ("disagreement >= ", min_disagreement)):
        if value is not None:
            where.append(clause + mark)
            params.append(value)
    sql = "SELECT record FROM pairs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at, pair_id"
    if limit is not None:
        sql += " LIMIT " + mark
        params.append(limit)
    return sql, params


LABEL_COLUMNS = ("label_id", "pair_id", "verdict", "corrected", "reviewer", "created_at")


def insert_label_sql(mark: str) -> str:
    """Insert a label only when its pair exists (parameters: the label's columns, then pair_id)."""
    return (f"INSERT INTO labels ({', '.join(LABEL_COLUMNS)}) "
            f"SELECT {', '.join([mark] * len(LABEL_COLUMNS))} "
            f"WHERE EXISTS (SELECT 1 FROM pairs WHERE pair_id = {mark})")


def label_params(label: Label) -> list:
    return [getattr(label, c) for c in LABEL_COLUMNS] + [label.pair_id]


class ReviewReads:
    """The review page's reads, for a store that runs SQL in `dialect` through `_rows`."""

    dialect: Dialect

    def _rows(self, sql: str, params: Sequence) -> list[tuple]:
        raise NotImplementedError

    def feedback_for(self, response_id: str) -> list[FeedbackRecord]:
        return [feedback_from_row(r) for r in self._rows(
            f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback WHERE response_id = "
            f"{self.dialect.mark} ORDER BY created_at, feedback_id", (response_id,))]

    def labels_for(self, pair_id: str) -> list[Label]:
        return [Label(*r) for r in self._rows(
            f"SELECT {', '.join(LABEL_COLUMNS)} FROM labels WHERE pair_id = {self.dialect.mark} "
            "ORDER BY created_at DESC, label_id DESC", (pair_id,))]

    def review_page(self, q: ReviewQuery) -> dict:
        d, rows = self.dialect, self._rows
        count_sql, page, params = page_sql(q, d)
        total = rows(count_sql, params)[0][0]
        pairs = [PairRecord.from_json(r[0]) for r in rows(page, [*params, q.size, q.offset])]
        ids = [p.pair_id for p in pairs]
        labels, counts = {}, {}
        if ids:
            marks = ", ".join([d.mark] * len(ids))
            for row in rows(f"SELECT {', '.join(LABEL_COLUMNS)} FROM labels WHERE pair_id IN "
                            f"({marks}) ORDER BY created_at, label_id", ids):
                labels[row[1]] = Label(*row)  # the newest wins
            counts = dict(rows(f"SELECT response_id, count(*) FROM feedback WHERE response_id "
                               f"IN ({marks}) GROUP BY response_id", ids))
        return {"total": total, "page": q.page, "size": q.size, "sort": q.sort,
                "items": [list_item(p, labels.get(p.pair_id), counts.get(p.pair_id, 0))
                          for p in pairs]}

    def review_summary(self, q: ReviewQuery) -> dict:
        params = where_sql(q, self.dialect)[2]
        totals = self._rows(summary_sql(q, self.dialect)["totals"], params)[0]
        name, prefix = bucket_length(totals[2], totals[3])
        sql = summary_sql(q, self.dialect, prefix)
        return summary(totals, *(self._rows(sql[k], params) for k in
                                 ("labels", "histogram", "routes", "versions", "series")), name)

    def review_facets(self) -> dict:
        def values(sql: str) -> list:
            return sorted((r[0] for r in self._rows(sql, ())),
                          key=lambda v: (v is None, v or ""))

        return {"routes": values("SELECT DISTINCT route FROM pairs"),
                "versions": values("SELECT DISTINCT student_version FROM pairs"),
                "metrics": values("SELECT DISTINCT metric FROM feedback"),
                "verdicts": list(VERDICTS)}


def feedback_row(f: FeedbackRecord) -> dict:
    return {"feedback_id": f.feedback_id, "response_id": f.response.response_id,
            "route": f.response.route, "variant": f.response.variant,
            "version": f.response.version, "metric": f.metric, "value": f.value,
            "comment": f.comment, "created_at": f.created_at}


def feedback_from_row(row: Sequence) -> FeedbackRecord:
    """A `FeedbackRecord` from a row in `FEEDBACK_COLUMNS` order."""
    fid, rid, route, variant, version, metric, value, comment, created = row
    return FeedbackRecord(fid, ResponseRecord(rid, route, variant, version, "-"), metric,
                          value, comment, created)
