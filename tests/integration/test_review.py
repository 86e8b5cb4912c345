"""The review page's backend: query parsing, the word diff, labels, the store's review reads on
SQLite and on a real PostgreSQL, and the HTTP side (auth, cookie, errors) as an ASGI app."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.review import (
    COOKIE,
    MAX_FAILED_LOGINS,
    ReviewSite,
    asgi_app,
    session_secret,
    session_token,
)
from shadow.labels import LabelError, parse_label
from shadow.records import Answer, FeedbackRecord, ResponseRecord
from shadow.review_queries import ReviewError, ReviewQuery, like_pattern
from shadow.store import SqliteStore
from shadow.store.postgres import PostgresStore
from shadow.word_diff import word_diff
from tests.integration.test_pgstore import dsn, pg  # noqa: F401 - the PostgreSQL fixtures
from tests.unit.test_records import make_record

pytestmark = pytest.mark.integration

NOW = "2026-11-29T10:00:00.000000+00:00"


# --- pure pieces -------------------------------------------------------------------------------------


def test_query_parses_every_filter_and_names_bad_parameters():
    q = ReviewQuery.parse({"route": "a", "version": "v2", "since": "2026-11-28",
                           "until": "2026-11-28T12:00+01:00", "min": "0.2", "max": "0.9",
                           "feedback": "thumbs_up=false", "label": "unlabelled", "q": " Paris ",
                           "sort": "newest", "page": "3", "size": "10"})
    assert (q.route, q.version, q.text, q.sort, q.page, q.size, q.offset) == (
        "a", "v2", "Paris", "newest", 3, 10, 20)
    assert q.since == "2026-11-28T00:00:00.000000+00:00"
    assert q.until == "2026-11-28T11:00:00.000000+00:00"
    assert (q.feedback.metric, q.feedback.value, q.feedback.keep) == ("thumbs_up", 0.0, True)
    assert ReviewQuery.parse({"route": "", "q": "  "}) == ReviewQuery()
    for params, param in (({"min": "x"}, "min"), ({"max": "2"}, "max"),
                          ({"min": "0.8", "max": "0.2"}, "min"), ({"since": "soon"}, "since"),
                          ({"label": "great"}, "label"), ({"sort": "random"}, "sort"),
                          ({"feedback": "thumbs"}, "feedback"), ({"size": "1000"}, "size"),
                          ({"page": "0"}, "page"), ({"q": "x" * 501}, "q")):
        with pytest.raises(ReviewError) as e:
            ReviewQuery.parse(params)
        assert e.value.param == param


def test_like_pattern_takes_wildcards_literally():
    assert like_pattern("50%_off\\") == "%50\\%\\_off\\\\%"


def test_word_diff_marks_changed_words():
    assert word_diff("The capital is Paris.", "The capital of France is Paris!") == [
        ["same", "The capital "], ["teacher", "of France "], ["same", "is Paris"],
        ["student", "."], ["teacher", "!"]]
    # A blank between two changes joins them: one student run, one teacher run.
    assert word_diff("red big cat", "blue small cat") == [
        ["student", "red big"], ["teacher", "blue small"], ["same", " cat"]]
    assert word_diff("", "") == []


def test_word_diff_is_bounded_and_then_shows_two_blocks():
    student, teacher = " ".join(["the cat"] * 1500), " ".join(["the dog"] * 1500)
    assert word_diff(student, teacher) == [["student", student], ["teacher", teacher]]  # edits
    near = student.replace("cat", "cow", 1)
    assert len(word_diff(student, near)) == 4  # few edits: a real diff, however long
    assert word_diff(student, near, budget_s=0) == [["student", student], ["teacher", near]]


@given(st.text(alphabet="ab .\n<é", max_size=40), st.text(alphabet="ab .\n<é", max_size=40))
def test_word_diff_rebuilds_both_answers(student, teacher):
    diff = word_diff(student, teacher)
    assert "".join(t for k, t in diff if k != "teacher") == student
    assert "".join(t for k, t in diff if k != "student") == teacher
    assert all(t for _, t in diff)


def test_label_parsing_names_the_bad_field():
    label = parse_label({"verdict": "teacher", "reviewer": " ana ", "corrected": "  "}, "p1", NOW)
    assert (label.verdict, label.reviewer, label.corrected, label.pair_id) == (
        "teacher", "ana", None, "p1")
    for body, param in (([], "body"), ({"verdict": "best", "reviewer": "a"}, "verdict"),
                        ({"verdict": "student"}, "reviewer"),
                        ({"verdict": "student", "reviewer": "a" * 101}, "reviewer"),
                        ({"verdict": "student", "reviewer": "a", "corrected": 3}, "corrected"),
                        ({"verdict": "student", "reviewer": "a", "corrected": "a\x00"},
                         "corrected"),
                        ({"verdict": "student", "reviewer": "a", "corrected": "a\ud800"},
                         "corrected"),
                        ({"verdict": "student", "reviewer": "\udc00"}, "reviewer")):
        with pytest.raises(LabelError) as e:
            parse_label(body, "p1", NOW)
        assert e.value.param == param


def test_a_corrected_answer_is_redacted():
    from shadow.redact import Redactor

    body = {"verdict": "both_wrong", "reviewer": "a",
            "corrected": "Write to ann@example.com, SSN 123-45-6789."}
    label = parse_label(body, "p1", NOW, Redactor())
    assert label.corrected == "Write to [EMAIL], SSN [SSN]."
    assert parse_label(body, "p1", NOW).corrected == body["corrected"]  # no redactor: as sent


# --- the store's review reads, on both backends ------------------------------------------------------


def seeded(store):
    """12 pairs: routes a/b, versions v1/v2, two days, disagreement i/12 (one unscored), two
    with feedback, one with LIKE's wildcards in its answer."""
    pairs = []
    for i in range(12):
        day = "28" if i < 6 else "29"
        scores = {} if i == 0 else {"disagreement": i / 12, "rouge_l": 1 - i / 12}
        student = "50%_off" if i == 5 else f"student says {i}"
        pairs.append(make_record(
            i, route="a" if i % 2 else "b", scores=scores,
            created_at=f"2026-11-{day}T{10 + i:02d}:00:00.000000+00:00",
            request={"messages": [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": f"Question number {i}"}]},
            student=Answer("s", "v1" if i < 8 else "v2", student, "stop", 3, 4, 10.0, 20.0)))
    store.write_batch(pairs)
    for pair_id, metric, value in ((pairs[3].pair_id, "thumbs_up", 0.0),
                                   (pairs[4].pair_id, "thumbs_up", 1.0)):
        response = ResponseRecord(pair_id, "a", "student-a", "v1", NOW)
        store.write_batch([response])
        store.add_feedback(FeedbackRecord(f"fb-{pair_id}", response, metric, value, None, NOW))
    return pairs


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SqliteStore(tmp_path / "pairs.sqlite")
    return PostgresStore(request.getfixturevalue("dsn"))


def ids(store, **params) -> list[str]:
    page = store.review_page(ReviewQuery.parse({"size": "50", **params}))
    assert page["total"] == len(page["items"])
    return [item["pair_id"] for item in page["items"]]


def test_review_filters_sorts_and_pages(store):
    pairs = seeded(store)
    pid = [p.pair_id for p in pairs]
    assert ids(store) == pid[11:0:-1] + [pid[0]]  # most disagreement first, unscored last
    assert ids(store, sort="oldest") == pid and ids(store, sort="newest") == pid[::-1]
    assert ids(store, route="a", sort="oldest") == pid[1::2]
    assert ids(store, version="v2", sort="oldest") == pid[8:]
    assert ids(store, since="2026-11-29", until="2026-11-29T18:00", sort="oldest") == pid[6:8]
    assert ids(store, min="0.5", max="0.75", sort="oldest") == pid[6:10]
    assert ids(store, feedback="any", sort="oldest") == pid[3:5]
    assert ids(store, feedback="thumbs_up=false") == [pid[3]]
    assert ids(store, feedback="thumbs_up!=false", sort="oldest") == pid[:3] + pid[4:]
    assert len(ids(store, feedback="none")) == 10
    assert ids(store, q="question NUMBER 7") == [pid[7]]  # the prompt, any case
    assert ids(store, q="says 9") == [pid[9]]  # the student's answer
    assert len(ids(store, q="teacher answer 1")) == 3  # the teacher's: 1, 10, 11
    assert ids(store, q="%_") == [pid[5]]  # wildcards match themselves
    assert ids(store, q="be brief", route="b", max="0.3", sort="oldest") == [pid[2]]

    page = store.review_page(ReviewQuery.parse({"size": "5", "page": "3"}))
    assert page["total"] == 12 and [i["pair_id"] for i in page["items"]] == [pid[1], pid[0]]
    item = store.review_page(ReviewQuery.parse({"route": "a", "size": "1"}))["items"][0]
    assert item["prompt"] == "Question number 11" and item["student_version"] == "v2"
    assert item["label"] is None and item["feedback"] == 0
    assert store.review_page(ReviewQuery.parse({"feedback": "any", "size": "1"}))[
        "items"][0]["feedback"] == 1


def test_labels_are_history_and_the_latest_counts(store):
    pairs = seeded(store)
    first, second = pairs[7].pair_id, pairs[8].pair_id
    assert not store.add_label(parse_label({"verdict": "teacher", "reviewer": "a"}, "nope", NOW))
    for pair_id, verdict, at in ((first, "student", "2026-11-29T10"), (first, "teacher",
                                 "2026-11-29T11"), (second, "both_wrong", "2026-11-29T10:30")):
        body = {"verdict": verdict, "reviewer": "ana", "corrected": f"fix {at}"}
        assert store.add_label(parse_label(body, pair_id, at))
    assert [x.verdict for x in store.labels_for(first)] == ["teacher", "student"]
    assert [x.pair_id for x in store.iter_labels()] == [first, second, first]
    assert sorted(ids(store, label="labelled")) == sorted([first, second])
    assert ids(store, label="teacher") == [first] and ids(store, label="student") == []
    assert len(ids(store, label="unlabelled")) == 10
    item = store.review_page(ReviewQuery.parse({"label": "teacher"}))["items"][0]
    assert item["label"] == {"verdict": "teacher", "reviewer": "ana",
                             "created_at": "2026-11-29T11", "corrected": True}


def test_summary_and_facets(store):
    pairs = seeded(store)
    store.add_label(parse_label({"verdict": "teacher", "reviewer": "a"}, pairs[9].pair_id, NOW))
    s = store.review_summary(ReviewQuery())
    assert (s["total"], s["scored"], s["labelled"]) == (12, 11, 1)
    assert s["labels"] == {"student": 0, "teacher": 1, "both_fine": 0, "both_wrong": 0}
    # i/12 for i in 1..11 fall in tenths 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9
    assert s["histogram"]["counts"] == [1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert len(s["histogram"]["edges"]) == 11
    assert [r["route"] for r in s["top_routes"]] == ["a", "b"]  # a: odd i, higher mean
    routes = {r["route"]: r for r in s["top_routes"]}
    assert routes["a"]["pairs"] == 6 and routes["a"]["mean"] == pytest.approx(0.5)
    assert routes["a"]["high"] == 3  # 7/12, 9/12, 11/12
    assert [v["version"] for v in s["top_versions"]] == ["v2", "v1"]
    assert s["timeseries"]["bucket"] == "hour"
    series = {x["version"]: x["points"] for x in s["timeseries"]["series"]}
    assert series["v2"][0] == ["2026-11-29T18", pytest.approx(8 / 12, abs=1e-4), 1]
    assert sum(n for points in series.values() for _, _, n in points) == 11
    filtered = store.review_summary(ReviewQuery.parse({"route": "b", "min": "0.5"}))
    assert (filtered["total"], filtered["labelled"]) == (3, 0)  # 6/12, 8/12, 10/12
    facets = store.review_facets()
    assert facets["routes"] == ["a", "b"] and facets["versions"] == ["v1", "v2"]
    assert facets["metrics"] == ["thumbs_up"] and "both_wrong" in facets["verdicts"]


def test_postgres_search_survives_a_nul_in_an_answer(dsn):  # noqa: F811
    store = PostgresStore(dsn)
    store.write_batch([make_record(1, student=Answer("s", "v1", "bad\x00byte here", "stop",
                                                     1, 1, 1.0, 2.0))])
    assert ids(store, q="byte here") == [make_record(1).pair_id]


# --- HTTP --------------------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path):
    store = SqliteStore(tmp_path / "pairs.sqlite")
    pairs = seeded(store)
    return ReviewSite(lambda: store, ("key-1", "key-2")), pairs


def client(site_, **kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app(site_)),
                             base_url="https://review.test", **kw)


async def test_pages_need_a_key_or_its_cookie(site):
    site_, _ = site
    async with client(site_) as http:
        page = await http.get("/review")
        assert page.status_code == 401 and 'name="key"' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert (await http.get("/review/api/pairs")).json()["error"]["type"] == \
            "authentication_error"
        wrong = await http.post("/review/login", data={"key": "nope"})
        assert wrong.status_code == 401 and "not one of the gateway&#x27;s API keys" in wrong.text
        ok = await http.post("/review/login", data={"key": "key-2"})
        assert ok.status_code == 303 and ok.headers["location"] == "/review"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" in cookie
        assert "key-2" not in cookie and "Max-Age=28800" in cookie
        shell = await http.get("/review")
        assert shell.status_code == 200 and "/review/static/review.js" in shell.text
        assert (await http.get("/review/static/review.js")).headers["content-type"].startswith(
            "text/javascript")
        assert (await http.get("/review/api/pairs")).json()["total"] == 12
        session = http.cookies[COOKIE]
        await http.post("/review/logout")
        assert (await http.get("/review/api/pairs")).status_code == 401
    async with client(site_, cookies={COOKIE: session}) as http:  # a copy kept: revoked
        assert (await http.get("/review/api/pairs")).status_code == 401
    async with client(site_, headers={"Authorization": "Bearer key-1"}) as http:
        assert (await http.get("/review/api/facets")).json()["routes"] == ["a", "b"]
    forged = session_token(session_secret(("other",)), time.time())
    for value in (forged, session.replace(".", "x", 1), "", "a.b.c.d"):
        async with client(site_, cookies={COOKIE: value}) as http:
            assert (await http.get("/review/api/facets")).status_code == 401, value


async def test_sessions_expire_and_failed_logins_are_throttled(tmp_path):
    now = [1_000_000.0]
    site_ = ReviewSite(lambda: SqliteStore(tmp_path / "pairs.sqlite"), ("key-1",),
                       clock=lambda: now[0])
    async with client(site_) as http:
        assert (await http.post("/review/login", data={"key": "key-1"})).status_code == 303
        assert (await http.get("/review/api/facets")).status_code == 200
        now[0] += 8 * 3600 + 1  # the session's lifetime is over, whatever the browser keeps
        assert (await http.get("/review/api/facets")).status_code == 401
        for _ in range(MAX_FAILED_LOGINS):
            assert (await http.post("/review/login", data={"key": "guess"})).status_code == 401
        throttled = await http.post("/review/login", data={"key": "key-1"})
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) <= 61
        now[0] += 61
        assert (await http.post("/review/login", data={"key": "key-1"})).status_code == 303


async def test_pair_view_and_labelling_over_http(site):
    site_, pairs = site
    pair_id = pairs[6].pair_id
    async with client(site_, headers={"Authorization": "Bearer key-1"}) as http:
        view = (await http.get(f"/review/api/pairs/{pair_id}")).json()
        assert view["pair"]["messages"][1]["content"] == "Question number 6"
        assert view["pair"]["student"]["ttft_ms"] == 10.0 and view["pair"]["scores"]["rouge_l"]
        assert {k for k, _ in view["diff"]} == {"same", "student", "teacher"}
        assert view["labels"] == [] and view["feedback"] == []
        fb = (await http.get(f"/review/api/pairs/{pairs[3].pair_id}")).json()["feedback"]
        assert fb[0]["metric"] == "thumbs_up" and fb[0]["value"] == 0.0

        posted = await http.post(f"/review/api/pairs/{pair_id}/label",
                                 json={"verdict": "both_wrong", "reviewer": "ana",
                                       "corrected": "<b>fixed</b>"})
        assert posted.status_code == 201 and posted.json()["label"]["verdict"] == "both_wrong"
        view = (await http.get(f"/review/api/pairs/{pair_id}")).json()
        assert view["labels"][0]["corrected"] == "<b>fixed</b>"  # stored as text, as sent

        async def error(method, path, **kw):
            response = await http.request(method, path, **kw)
            return response.status_code, response.json()["error"]["param"]

        label_path = f"/review/api/pairs/{pair_id}/label"
        assert await error("POST", label_path, json={"verdict": "x", "reviewer": "a"}) == (
            400, "verdict")
        assert await error("POST", label_path, content=b"verdict=teacher", headers={
            "content-type": "application/x-www-form-urlencoded"}) == (415, None)
        assert await error("POST", label_path, content=b"{", headers={
            "content-type": "application/json"}) == (400, None)
        assert await error("POST", "/review/api/pairs/nope/label",
                           json={"verdict": "student", "reviewer": "a"}) == (404, "pair_id")
        assert await error("GET", "/review/api/pairs/nope") == (404, "pair_id")
        assert await error("GET", "/review/api/pairs?min=7") == (400, "min")
        assert await error("GET", label_path) == (405, None)
        assert await error("GET", "/review/api/nothing") == (404, None)
        big = json.dumps({"verdict": "student", "reviewer": "a", "corrected": "x" * 600_000})
        assert await error("POST", label_path, content=big.encode(), headers={
            "content-type": "application/json"}) == (413, None)
        assert len(site_.store.labels_for(pair_id)) == 1  # nothing bad was stored


async def test_an_unreachable_store_is_a_503(tmp_path):
    site_ = ReviewSite(lambda: SqliteStore(tmp_path / "missing" / "pairs.sqlite"), ())
    async with client(site_) as http:
        response = await http.get("/review/api/pairs")
        assert response.status_code == 503 and response.json()["error"]["code"] == \
            "store_unavailable"
        assert (await http.get("/review")).status_code == 200  # no keys: the page is open
