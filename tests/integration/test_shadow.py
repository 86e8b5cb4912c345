"""Mirroring on real Ray Serve: pairs land in the store; a bad teacher never touches the user."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.engines.fake import WORDS
from shadow.store import SqliteStore
from tests.integration.conftest import Gateway, free_port, scrape, wait_for_metric

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "Explain tides."}]


class BadTeacher:
    """An OpenAI-compatible URL on 127.0.0.1 that hangs (bounded) or fails with 500."""

    def __init__(self):
        self.port = free_port()
        self.seen_marker = 0

        async def hang(request):
            self.seen_marker += request.headers.get("x-protege-shadow") == "1"
            await asyncio.sleep(30)  # a teacher that hangs for 30 s
            return JSONResponse({})

        async def fail(request):
            self.seen_marker += request.headers.get("x-protege-shadow") == "1"
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        app = Starlette(routes=[Route("/hang/chat/completions", hang, methods=["POST"]),
                                Route("/fail/chat/completions", fail, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


class ResettingServer:
    """A TCP listener on 127.0.0.1 that resets every connection as soon as it arrives."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.resets = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger 0: the peer gets RST, not FIN
            self.resets += 1

    def stop(self):
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def resetting():
    server = ResettingServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bad_teacher():
    t = BadTeacher()
    yield t
    t.stop()


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory, bad_teacher, resetting):
    tmp = tmp_path_factory.mktemp("shadow")
    remote = {"engine": "remote", "model": "teacher", "timeout_s": 30}
    down = free_port()  # nothing listens there
    config = {
        "server": {"ingress": {"replicas": 1, "num_cpus": 0}, "request_timeout_s": 20},
        "shadow": {"store_path": str(tmp / "pairs.sqlite"), "spill_dir": str(tmp / "spill"),
                   "timeout_s": 2, "semantic_model": None, "max_pending": 200,
                   "max_in_flight": 1000},
        "variants": {
            "student": {"engine": {"engine": "fake", "completion_tokens": 8}, "num_cpus": 0,
                        "version": "s1"},
            "teacher": {"engine": {"engine": "fake", "completion_tokens": 10}, "num_cpus": 0,
                        "version": "t1"},
            "student-b": {"engine": {"engine": "fake", "completion_tokens": 6}, "num_cpus": 0,
                          "version": "b1"},
        },
        "feedback": {"thumbs_up": {"type": "boolean"},
                     "rating": {"type": "float", "min": 1, "max": 5},
                     "note": {"type": "comment"}},
        "routes": {
            "all": {"variant": "student", "shadow": {"variant": "teacher", "sample_rate": 1}},
            "half": {"variant": "student", "shadow": {"variant": "teacher", "sample_rate": 0.5}},
            "plain": {"variant": "student"},
            # Every fake word is a label: both answers name the first word they say.
            "classify": {"variant": "student", "labels": list(WORDS),
                         "shadow": {"variant": "teacher", "sample_rate": 1}},
            "private": {"variant": "student", "shadow": {"variant": "teacher", "sample_rate": 1,
                                                         "store_prompt": False}},
            "ab": {"variant": "student", "sticky_key": "request", "arms": [
                {"variant": "student", "weight": 1}, {"variant": "student-b", "weight": 1}]},
            "hang": {"variant": "student", "shadow": {"sample_rate": 1, "remote": {
                **remote, "base_url": f"http://127.0.0.1:{bad_teacher.port}/hang"}}},
            "fail": {"variant": "student", "shadow": {"sample_rate": 1, "remote": {
                **remote, "base_url": f"http://127.0.0.1:{bad_teacher.port}/fail"}}},
            "down": {"variant": "student", "shadow": {"sample_rate": 1, "remote": {
                **remote, "base_url": f"http://127.0.0.1:{down}/v1"}}},
            "reset": {"variant": "student", "shadow": {"sample_rate": 1, "remote": {
                **remote, "base_url": f"http://127.0.0.1:{resetting.port}/v1"}}},
        },
    }
    gw = Gateway(config, tmp)
    gw.store = SqliteStore(tmp / "pairs.sqlite")
    yield gw
    gw.stop()


def wait_for_pairs(store, count, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store.path.exists() and store.count() >= count:
            return
        time.sleep(0.3)
    raise AssertionError(f"{store.count() if store.path.exists() else 0} pairs, wanted {count}")


def test_every_sampled_request_becomes_a_scored_pair(shadowed):
    client = shadowed.client()
    answers = {}
    for i in range(6):
        if i % 2:
            r = client.chat.completions.create(model="all", messages=MSG, seed=i)
            answers[r.id] = r.choices[0].message.content
        else:
            chunks = list(client.chat.completions.create(model="all", messages=MSG, seed=i,
                                                         stream=True))
            answers[chunks[0].id] = "".join(c.choices[0].delta.content or "" for c in chunks
                                            if c.choices)
    client.chat.completions.create(model="plain", messages=MSG)  # not mirrored
    wait_for_pairs(shadowed.store, 6)
    assert shadowed.store.count() == 6
    for pair_id, text in answers.items():
        pair = shadowed.store.get(pair_id)
        assert pair is not None, pair_id
        assert pair.student.text == text and pair.student.version == "s1"
        assert pair.teacher.model == "teacher" and pair.teacher.version == "t1"
        assert pair.teacher.completion_tokens == 10 and pair.teacher.text
        assert len(pair.teacher_logprobs) == 10  # asked of the teacher though the user did not
        assert all(len(t["top"]) == 5 for t in pair.teacher_logprobs)
        assert pair.request["messages"] == MSG
        assert 0.0 <= pair.disagreement <= 1.0
        assert pair.student.latency_ms > 0 and pair.teacher.latency_ms > 0
    wait_for_metric(shadowed, "protege_shadow_mirrored_total", 6, route="all", outcome="sent")
    wait_for_metric(shadowed, "protege_shadow_records_total", 6, kind="pair",
                    outcome="stored")


def test_rejected_requests_are_never_mirrored(shadowed):
    before = scrape(shadowed, "protege_shadow_mirrored_total", route="all")
    with shadowed.http() as http:
        too_long = {"model": "all", "messages": MSG, "max_tokens": 100_000}  # over the window
        assert http.post("/v1/chat/completions", json=too_long).status_code == 400
        bad = {"model": "all", "messages": MSG, "temperature": 9}
        assert http.post("/v1/chat/completions", json=bad).status_code == 400
    r = shadowed.client().chat.completions.create(model="all", messages=MSG)  # one that counts
    wait_for_metric(shadowed, "protege_shadow_mirrored_total", before + 1, route="all")
    wait_for_pairs(shadowed.store, 7)  # the 6 above and this one: the 400s left no pair
    assert shadowed.store.count() == 7 and shadowed.store.get(r.id) is not None


def test_sample_rate_is_respected(shadowed):
    client = shadowed.client()
    for _ in range(100):
        client.chat.completions.create(model="half", messages=MSG)
    deadline = time.monotonic() + 30
    sent = 0.0
    while time.monotonic() < deadline:
        sent = scrape(shadowed, "protege_shadow_mirrored_total", route="half", outcome="sent")
        time.sleep(1)
        if sent == scrape(shadowed, "protege_shadow_mirrored_total", route="half",
                          outcome="sent"):
            break
    assert 30 <= sent <= 70, sent


@pytest.mark.parametrize("route", ["hang", "fail", "down", "reset"])
def test_bad_teacher_leaves_the_user_untouched(shadowed, route):
    client = shadowed.client()
    for stream in (False, True, False):
        r = client.chat.completions.create(model=route, messages=MSG, stream=stream)
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        else:
            assert r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    if route == "hang":
        # The users got their answers while the teacher calls were still hanging.
        assert scrape(shadowed, "protege_shadow_requests_total", route=route,
                      outcome="timeout") < 3
    outcome = "timeout" if route == "hang" else "failed"
    wait_for_metric(shadowed, "protege_shadow_requests_total", 3, route=route,
                    outcome=outcome, timeout_s=30)


def test_remote_teacher_sees_the_marker_header(bad_teacher):
    assert bad_teacher.seen_marker >= 6  # every call to /hang and /fail carried it


def test_resetting_teacher_was_really_reached(resetting):
    assert resetting.resets >= 3


# --- feedback ----------------------------------------------------------------------------------


def post_feedback(gw, response_id, metric, value):
    with gw.http() as http:
        return http.post("/v1/feedback", json={"response_id": response_id, "metric": metric,
                                               "value": value})


def test_feedback_on_shadowed_plain_and_ab_responses(shadowed):
    client = shadowed.client()
    shadowed_id = client.chat.completions.create(model="all", messages=MSG).id
    plain_id = client.chat.completions.create(model="plain", messages=MSG).id
    ab = [client.chat.completions.with_raw_response.create(model="ab", messages=MSG)
          for _ in range(12)]
    arms = {r.headers["x-protege-variant"] for r in ab}
    assert arms == {"student", "student-b"}, arms  # 12 requests at 50/50: both arms answered

    r = post_feedback(shadowed, shadowed_id, "thumbs_up", True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "feedback" and body["id"].startswith("fb-")
    assert body["response_id"] == shadowed_id and body["metric"] == "thumbs_up"
    assert post_feedback(shadowed, plain_id, "rating", 4.5).status_code == 200
    assert post_feedback(shadowed, plain_id, "note", "too long").status_code == 200
    for resp in ab:
        assert post_feedback(shadowed, resp.parse().id, "thumbs_up",
                             resp.headers["x-protege-variant"] == "student").status_code == 200

    stored = {(f.response.response_id, f.metric): f for f in shadowed.store.iter_feedback()}
    assert stored[(shadowed_id, "thumbs_up")].value == 1.0
    assert stored[(shadowed_id, "thumbs_up")].response.route == "all"
    assert stored[(plain_id, "rating")].value == 4.5
    assert stored[(plain_id, "note")].comment == "too long"
    assert stored[(plain_id, "note")].response.version == "s1"
    by_arm = {v: sum(1 for r in ab if r.headers["x-protege-variant"] == v) for v in arms}
    wait_for_metric(shadowed, "protege_feedback_total", by_arm["student-b"], route="ab",
                    variant="student-b", version="b1", metric="thumbs_up")
    wait_for_metric(shadowed, "protege_feedback_total", by_arm["student"], route="ab",
                    variant="student", version="s1", metric="thumbs_up")
    # Booleans sum as 1/0: the mean per arm is value_sum / total.
    wait_for_metric(shadowed, "protege_feedback_value_sum_total", by_arm["student"], route="ab",
                    variant="student", metric="thumbs_up")
    wait_for_metric(shadowed, "protege_feedback_value_sum_total", 0, route="ab",
                    variant="student-b", metric="thumbs_up")
    wait_for_metric(shadowed, "protege_feedback_value_sum_total", 4.5, route="plain",
                    metric="rating")


def test_feedback_errors_name_the_problem(shadowed):
    rid = shadowed.client().chat.completions.create(model="plain", messages=MSG).id
    r = post_feedback(shadowed, "chatcmpl-never-answered", "thumbs_up", True)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "response_not_found"
    assert r.json()["error"]["param"] == "response_id"
    for metric, value, param in (("stars", 1, "metric"), ("thumbs_up", "yes", "value"),
                                 ("rating", 9, "value"), ("rating", True, "value"),
                                 ("note", "", "value")):
        r = post_feedback(shadowed, rid, metric, value)
        assert r.status_code == 400, (metric, value, r.text)
        assert r.json()["error"]["param"] == param
    with shadowed.http() as http:
        assert http.get("/v1/feedback").status_code == 405
        r = http.post("/v1/feedback", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    rejected = [f for f in shadowed.store.iter_feedback() if f.response.response_id == rid]
    assert rejected == []  # nothing from a refused post was stored


def test_personal_data_never_reaches_the_store(shadowed):
    client = shadowed.client()
    secret = [{"role": "user", "content": "I am ann@example.com, IBAN DE89 3704 0044 0532 0130 "
                                          "00, call me on +49 30 1234567."}]
    shared = client.chat.completions.create(model="all", messages=secret).id
    private = client.chat.completions.create(model="private", messages=secret).id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (shadowed.store.get(shared)
                                               and shadowed.store.get(private)):
        time.sleep(0.3)
    kept = shadowed.store.get(shared)
    assert kept.request["messages"][0]["content"] == "I am [EMAIL], IBAN [IBAN], call me on [PHONE]."
    bare = shadowed.store.get(private)
    assert "messages" not in bare.request and bare.teacher.text  # answers only
    for pair in (kept, bare):
        assert "ann@example.com" not in pair.to_json() and "1234567" not in pair.to_json()
    wait_for_metric(shadowed, "protege_shadow_redactions_total", 1, kind="iban")


def test_classification_routes_score_label_agreement(shadowed):
    client = shadowed.client()
    labelled = client.chat.completions.create(model="classify", messages=MSG, temperature=0).id
    plain = client.chat.completions.create(model="all", messages=MSG, temperature=0).id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (shadowed.store.get(labelled)
                                               and shadowed.store.get(plain)):
        time.sleep(0.3)
    # Greedy fake answers share their first words, so the first label agrees.
    assert shadowed.store.get(labelled).scores["label_agreement"] == 1.0
    assert shadowed.store.get(plain).scores["label_agreement"] is None
