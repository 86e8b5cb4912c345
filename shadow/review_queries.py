"""What the review page asks of the store, as pure pieces: filters, SQL, views.

`ReviewQuery.parse` turns the page's query parameters into a checked query (a bad value raises
`ReviewError` naming the parameter). `where_sql` renders its filters for a `Dialect` (SQLite or
PostgreSQL: placeholders, case-insensitive LIKE, reading text out of the record's JSON), and the
store runs the `*_sql` statements built here. `list_item` and `pair_view` are what the page gets
of a pair (with `shadow.word_diff`'s diff of the two answers). No I/O here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.errors import clip
from shadow.export import FeedbackFilter, messages_of
from shadow.labels import VERDICTS, Label
from shadow.records import FeedbackRecord, PairRecord
from shadow.word_diff import word_diff

SORTS = ("disagreement", "newest", "oldest")
LABEL_STATES = ("any", "unlabelled", "labelled", *VERDICTS)
MAX_PAGE_SIZE = 200
HIGH_DISAGREEMENT = 0.5  # the summary's "high" column counts pairs at least this far apart
HISTOGRAM_BINS = 10
MAX_SERIES = 12  # student versions drawn in the time chart (the most frequent)


class ReviewError(ValueError):
    """A query parameter the review cannot use; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def parse_time(value: str) -> str:
    """An ISO 8601 date or time as the store keeps times (UTC, microseconds); naive is UTC."""
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time, e.g. 2026-11-28 or "
                         "2026-11-28T21:00:00+00:00") from None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.isoformat(timespec="microseconds")


@dataclass(frozen=True)
class ReviewQuery:
    route: str | None = None
    version: str | None = None
    since: str | None = None
    until: str | None = None
    min_disagreement: float | None = None
    max_disagreement: float | None = None
    feedback: str | FeedbackFilter | None = None  # "any", "none" or a metric filter
    label: str = "any"
    text: str | None = None
    sort: str = "disagreement"
    page: int = 1
    size: int = 25

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> ReviewQuery:
        def get(name: str) -> str | None:
            value = params.get(name)
            return value.strip() or None if isinstance(value, str) else None

        def number(name: str, low: float, high: float) -> float | None:
            raw = get(name)
            if raw is None:
                return None
            try:
                value = float(raw)
            except ValueError:
                raise ReviewError(f"{name} must be a number, got {raw[:50]!r}", name) from None
            if not low <= value <= high:
                raise ReviewError(f"{name} must be between {low:g} and {high:g}", name)
            return value

        def time(name: str) -> str | None:
            raw = get(name)
            try:
                return None if raw is None else parse_time(raw)
            except ValueError as e:
                raise ReviewError(f"{name}: {e}", name) from None

        feedback: str | FeedbackFilter | None = get("feedback")
        if feedback is not None and feedback not in ("any", "none"):
            try:
                feedback = FeedbackFilter.parse(feedback)
            except ValueError as e:
                raise ReviewError(f"feedback: any, none, or {e}", "feedback") from None
        label = get("label") or "any"
        if label not in LABEL_STATES:
            raise ReviewError(f"label must be one of {', '.join(LABEL_STATES)}", "label")
        sort = get("sort") or "disagreement"
        if sort not in SORTS:
            raise ReviewError(f"sort must be one of {', '.join(SORTS)}", "sort")
        low, high = number("min", 0, 1), number("max", 0, 1)
        if low is not None and high is not None and low > high:
            raise ReviewError("min is greater than max", "min")
        text = get("q")
        if text is not None and len(text) > 500:
            raise ReviewError("q: at most 500 characters", "q")
        return cls(route=get("route"), version=get("version"), since=time("since"),
                   until=time("until"), min_disagreement=low, max_disagreement=high,
                   feedback=feedback, label=label, text=text, sort=sort,
                   page=int(number("page", 1, 1_000_000) or 1),
                   size=int(number("size", 1, MAX_PAGE_SIZE) or 25))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size


# --- SQL -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """How one database spells what the review's SQL needs."""

    mark: str  # the driver's placeholder
    like: str  # case-insensitive LIKE
    search_from: str  # extra FROM items that `search` reads (the record parsed as JSON)
    search: str  # a boolean over `{mark}` x3: the prompt, the student or the teacher text matches
    bucket: str  # the histogram bin (0..HISTOGRAM_BINS-1) of p.disagreement


SQLITE = Dialect(
    mark="?", like="LIKE", search_from="",
    search=("(EXISTS (SELECT 1 FROM json_each(p.record, '$.request.messages') m "
            "WHERE json_extract(m.value, '$.content') LIKE ? ESCAPE '\\') "
            "OR json_extract(p.record, '$.request.prompt') LIKE ? ESCAPE '\\' "
            "OR json_extract(p.record, '$.student.text') LIKE ? ESCAPE '\\' "
            "OR json_extract(p.record, '$.teacher.text') LIKE ? ESCAPE '\\')"),
    bucket=f"min({HISTOGRAM_BINS - 1}, CAST(p.disagreement * {HISTOGRAM_BINS} AS INTEGER))",
)
# PostgreSQL's json refuses \u0000 when it reads a string out: a space stands in for searching.
POSTGRES = Dialect(
    mark="%s", like="ILIKE",
    search_from=", LATERAL (SELECT replace(p.record, '\\u0000', '\\u0020')::json AS j) r",
    search=("(EXISTS (SELECT 1 FROM json_array_elements(CASE WHEN json_typeof("
            "r.j->'request'->'messages') = 'array' THEN r.j->'request'->'messages' "
            "ELSE '[]'::json END) m WHERE m->>'content' ILIKE %s) "
            "OR r.j->'request'->>'prompt' ILIKE %s "
            "OR r.j->'student'->>'text' ILIKE %s OR r.j->'teacher'->>'text' ILIKE %s)"),
    bucket=f"least({HISTOGRAM_BINS - 1}, floor(p.disagreement * {HISTOGRAM_BINS})::int)",
)

LATEST_VERDICT = ("(SELECT l.verdict FROM labels l WHERE l.pair_id = p.pair_id "
                  "ORDER BY l.created_at DESC, l.label_id DESC LIMIT 1)")


def like_pattern(text: str) -> str:
    """`%text%` with LIKE's wildcards in `text` taken literally (escape character `\\`)."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def where_sql(q: ReviewQuery, d: Dialect) -> tuple[str, str, list[Any]]:
    """The extra FROM items, the WHERE clause (or "") and its parameters, over `pairs p`."""
    where: list[str] = []
    params: list[Any] = []
    m = d.mark
    for clause, value in (("p.route = ", q.route), ("p.student_version = ", q.version),
                          ("p.created_at >= ", q.since), ("p.created_at < ", q.until),
                          ("p.disagreement >= ", q.min_disagreement),
                          ("p.disagreement <= ", q.max_disagreement)):
        if value is not None:
            where.append(clause + m)
            params.append(value)
    has_feedback = "EXISTS (SELECT 1 FROM feedback f WHERE f.response_id = p.pair_id{})"
    if q.feedback == "any":
        where.append(has_feedback.format(""))
    elif q.feedback == "none":
        where.append("NOT " + has_feedback.format(""))
    elif isinstance(q.feedback, FeedbackFilter):
        clause = has_feedback.format(f" AND f.metric = {m} AND f.value = {m}")
        where.append(clause if q.feedback.keep else "NOT " + clause)
        params += [q.feedback.metric, q.feedback.value]
    has_label = "EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.pair_id)"
    if q.label == "labelled":
        where.append(has_label)
    elif q.label == "unlabelled":
        where.append("NOT " + has_label)
    elif q.label != "any":
        where.append(f"{LATEST_VERDICT} = {m}")
        params.append(q.label)
    extra_from = ""
    if q.text is not None:
        extra_from = d.search_from
        where.append(d.search)
        params += [like_pattern(q.text)] * 4
    return extra_from, (" WHERE " + " AND ".join(where)) if where else "", params


ORDER = {
    "disagreement": "p.disagreement IS NULL, p.disagreement DESC, p.created_at DESC, p.pair_id",
    "newest": "p.created_at DESC, p.pair_id DESC",
    "oldest": "p.created_at, p.pair_id",
}


def page_sql(q: ReviewQuery, d: Dialect) -> tuple[str, str, list[Any]]:
    """(count statement, page statement, parameters + [limit, offset] for the page)."""
    extra_from, where, params = where_sql(q, d)
    base = f"FROM pairs p{extra_from}{where}"
    return (f"SELECT count(*) {base}",
            f"SELECT p.record {base} ORDER BY {ORDER[q.sort]} LIMIT {d.mark} OFFSET {d.mark}",
            params)


def summary_sql(q: ReviewQuery, d: Dialect, prefix: int = 13) -> dict[str, str]:
    """The summary's statements over the filtered pairs, each taking `where_sql`'s parameters;
    `series` groups by the first `prefix` characters of `created_at` (`bucket_length`)."""
    extra_from, where, _ = where_sql(q, d)
    scored = (where + " AND " if where else " WHERE ") + "p.disagreement IS NOT NULL"
    base, scored_base = f"FROM pairs p{extra_from}{where}", f"FROM pairs p{extra_from}{scored}"
    high = f"sum(CASE WHEN p.disagreement >= {HIGH_DISAGREEMENT} THEN 1 ELSE 0 END)"
    return {
        "totals": f"SELECT count(*), count(p.disagreement), min(p.created_at), "
                  f"max(p.created_at) {base}",
        "labels": f"SELECT v, count(*) FROM (SELECT {LATEST_VERDICT} AS v {base}) t "
                  "WHERE v IS NOT NULL GROUP BY v",
        "histogram": f"SELECT {d.bucket} AS b, count(*) {scored_base} GROUP BY b",
        "routes": f"SELECT p.route, count(*), avg(p.disagreement), {high} {scored_base} "
                  "GROUP BY p.route ORDER BY avg(p.disagreement) DESC, p.route LIMIT 10",
        "versions": f"SELECT p.student_version, count(*), avg(p.disagreement), {high} "
                    f"{scored_base} GROUP BY p.student_version "
                    "ORDER BY avg(p.disagreement) DESC LIMIT 10",
        "series": f"SELECT p.student_version, substr(p.created_at, 1, {int(prefix)}) AS t, "
                  f"avg(p.disagreement), count(*) {scored_base} "
                  "GROUP BY p.student_version, t ORDER BY t",
    }


def bucket_length(first: str | None, last: str | None) -> tuple[str, int]:
    """Hours for up to three days of pairs, days beyond: the bucket's name and its prefix length
    of an ISO time (`2026-11-28T21` is 13 characters)."""
    if first and last and (datetime.fromisoformat(last) - datetime.fromisoformat(first)).days >= 3:
        return "day", 10
    return "hour", 13


def summary(totals: Sequence, labels: Sequence, histogram: Sequence, routes: Sequence,
            versions: Sequence, series: Sequence, bucket: str) -> dict[str, Any]:
    """The summary panel from the rows of `summary_sql`'s statements."""
    counts = [0] * HISTOGRAM_BINS
    for b, n in histogram:
        counts[int(b)] = n
    by_version: dict[str | None, list] = {}
    for version, t, mean, n in series:
        by_version.setdefault(version, []).append([t, round(float(mean), 4), n])
    kept = sorted(by_version, key=lambda v: -sum(p[2] for p in by_version[v]))[:MAX_SERIES]
    labels_by = {v: n for v, n in labels}

    def groups(rows: Sequence, key: str) -> list[dict]:
        return [{key: k, "pairs": n, "mean": round(float(mean), 4), "high": int(high or 0)}
                for k, n, mean, high in rows]

    return {
        "total": totals[0], "scored": totals[1], "labelled": sum(labels_by.values()),
        "labels": {v: labels_by.get(v, 0) for v in VERDICTS},
        "histogram": {"edges": [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)],
                      "counts": counts},
        "top_routes": groups(routes, "route"), "top_versions": groups(versions, "version"),
        "high_threshold": HIGH_DISAGREEMENT,
        "timeseries": {"bucket": bucket, "series": [{"version": v, "points": by_version[v]}
                                                    for v in sorted(kept, key=str)]},
    }


# --- what the page shows ---------------------------------------------------------------------------



def prompt_of(pair: PairRecord) -> str | None:
    """The last user message (or the completion prompt): the list's one-line prompt."""
    messages = messages_of(pair) or []
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else None)


def list_item(pair: PairRecord, label: Label | None, feedback: int) -> dict[str, Any]:
    prompt = prompt_of(pair)
    return {
        "pair_id": pair.pair_id, "route": pair.route, "variant": pair.variant,
        "student_version": pair.student.version, "teacher": pair.teacher.model,
        "created_at": pair.created_at, "disagreement": pair.disagreement,
        "prompt": clip(prompt, 300) if prompt is not None else None,
        "student_text": clip(pair.student.text, 200),
        "teacher_text": clip(pair.teacher.text, 200), "feedback": feedback,
        "label": None if label is None else {
            "verdict": label.verdict, "reviewer": label.reviewer,
            "created_at": label.created_at, "corrected": label.corrected is not None},
    }


def pair_view(pair: PairRecord, feedback: Sequence[FeedbackRecord],
              labels: Sequence[Label]) -> dict[str, Any]:
    """The pair view: everything stored about the pair, the diff, its feedback and labels
    (newest first)."""
    request = dict(pair.request)
    messages, prompt = request.pop("messages", None), request.pop("prompt", None)
    sides = {side: dataclasses.asdict(getattr(pair, side)) for side in ("student", "teacher")}
    return {
        "pair": {"pair_id": pair.pair_id, "request_id": pair.request_id, "route": pair.route,
                 "variant": pair.variant, "target": pair.target, "created_at": pair.created_at,
                 "disagreement": pair.disagreement, "messages": messages, "prompt": prompt,
                 "params": request, **sides, "scores": pair.scores},
        "diff": word_diff(pair.student.text, pair.teacher.text),
        "feedback": [{"metric": f.metric, "value": f.value, "comment": f.comment,
                      "created_at": f.created_at} for f in feedback],
        "labels": [label.public() for label in labels],
    }
