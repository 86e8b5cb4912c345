"""Mirroring on real Ray Serve: pairs land in the store; a bad teacher never touches the user.

The module shares one gateway, so every test measures what it changed (metric deltas, its own
response ids) and passes alone and in any order.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import uuid

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from ops.gateway import Gateway, free_port, wait_until
from serving.engines.fake import WORDS
from serving.router import choose_arm
from shadow.store import SqliteStore
from tests.integration.conftest import settled, wait_for_metric

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "Explain tides."}]
SHADOW_TIMEOUT_S = 2  # shadow.timeout_s: how long the gateway waits for a teacher
AB_ARMS = [("student", 1), ("student-b", 1)]  # route "ab", sticky per user


def unique_msg() -> list[dict]:
    """A prompt no other call sends: the teacher can tell which user call it mirrors."""
    return [{"role": "user", "content": f"Explain tides. ({uuid.uuid4().hex})"}]


def key(name: str, **labels) -> tuple:
    """A metric as `settled` takes it."""
    return name, tuple(sorted(labels.items()))


class BadTeacher:
    """An OpenAI-compatible URL on 127.0.0.1 that hangs (bounded) or fails with 500.

    Each call is noted under its last message: the marker header it carried, and for /hang when
    it arrived and when the gateway hung up on it (`hung[prompt] = [arrived, closed]`).
    """

    def __init__(self):
        self.port = free_port()
        self.marker: dict[str, str | None] = {}
        self.hung: dict[str, list[float | None]] = {}

        async def note(request) -> str:
            prompt = (await request.json())["messages"][-1]["content"]
            self.marker[prompt] = request.headers.get("x-protege-shadow")
            return prompt

        async def hang(request):
            times = self.hung[await note(request)] = [time.monotonic(), None]
            try:  # hang until the gateway hangs up, at most 30 s
                async with asyncio.timeout(30):
                    while (await request.receive())["type"] != "http.disconnect":
                        pass
                times[1] = time.monotonic()
            except TimeoutError:
                pass
            return JSONResponse({})

        async def fail(request):
            await note(request)
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        app = Starlette(routes=[Route("/hang/chat/completions", hang, methods=["POST"]),
                                Route("/fail/chat/completions", fail, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "bad teacher start", 10, 0.05)

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
                   "timeout_s": SHADOW_TIMEOUT_S, "semantic_model": None, "max_pending": 200,
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
            "by-user": {"variant": "student", "shadow": {"variant": "teacher", "sample_rate": 0.5,
                                                         "sample_key": "user"}},
            "plain": {"variant": "student"},
            # Every fake word is a label: both answers name the first word they say.
            "classify": {"variant": "student", "labels": list(WORDS),
                         "shadow": {"variant": "teacher", "sample_rate": 1}},
            "private": {"variant": "student", "shadow": {"variant": "teacher", "sample_rate": 1,
                                                         "store_prompt": False}},
            "ab": {"variant": "student", "sticky_key": "user", "arms": [
                {"variant": v, "weight": w} for v, w in AB_ARMS]},
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


def stored(store, ids) -> set[str]:
    """Which of `ids` have a pair in the store."""
    return store.existing(list(ids)) if store.path.exists() else set()


def wait_for_pairs(store, ids, timeout_s=30):
    wait_until(lambda: stored(store, ids) == set(ids),
               f"pairs {sorted(set(ids) - stored(store, ids))}", timeout_s)


def wait_for(gw, metric: tuple, value: float, timeout_s: float = 20) -> None:
    wait_for_metric(gw, metric[0], value, timeout_s, **dict(metric[1]))


MIRRORED = key("protege_shadow_mirrored_total", route="all", outcome="sent")
PAIRS_STORED = key("protege_shadow_records_total", kind="pair", outcome="stored")


def test_every_sampled_request_becomes_a_scored_pair(shadowed):
    before = settled(shadowed, [MIRRORED, PAIRS_STORED])  # what earlier tests mirrored is in
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
    plain = client.chat.completions.create(model="plain", messages=MSG).id  # not mirrored
    wait_for_pairs(shadowed.store, answers)
    for pair_id, text in answers.items():
        pair = shadowed.store.get(pair_id)
        assert pair.student.text == text and pair.student.version == "s1"
        assert pair.teacher.model == "teacher" and pair.teacher.version == "t1"
        assert pair.teacher.completion_tokens == 10 and pair.teacher.text
        assert len(pair.teacher_logprobs) == 10  # asked of the teacher though the user did not
        assert all(len(t["top"]) == 5 for t in pair.teacher_logprobs)
        assert pair.request["messages"] == MSG
        assert 0.0 <= pair.disagreement <= 1.0
        assert pair.student.latency_ms > 0 and pair.teacher.latency_ms > 0
    wait_for(shadowed, MIRRORED, before[MIRRORED] + 6)
    # Six pairs stored, not seven: the plain request left none.
    wait_for(shadowed, PAIRS_STORED, before[PAIRS_STORED] + 6)
    assert shadowed.store.get(plain) is None


def test_rejected_requests_are_never_mirrored(shadowed):
    before = settled(shadowed, [MIRRORED, PAIRS_STORED])
    count = shadowed.store.count() if shadowed.store.path.exists() else 0
    with shadowed.http() as http:
        too_long = {"model": "all", "messages": MSG, "max_tokens": 100_000}  # over the window
        assert http.post("/v1/chat/completions", json=too_long).status_code == 400
        bad = {"model": "all", "messages": MSG, "temperature": 9}
        assert http.post("/v1/chat/completions", json=bad).status_code == 400
    r = shadowed.client().chat.completions.create(model="all", messages=MSG)  # one that counts
    wait_for_pairs(shadowed.store, [r.id])
    # One mirrored, one stored: the 400s, sent first, were not mirrored and left no pair.
    wait_for(shadowed, MIRRORED, before[MIRRORED] + 1)
    wait_for(shadowed, PAIRS_STORED, before[PAIRS_STORED] + 1)
    assert shadowed.store.count() == count + 1


def test_sample_rate_is_respected(shadowed):
    half = key("protege_shadow_mirrored_total", route="half", outcome="sent")
    before = settled(shadowed, [half])[half]
    client = shadowed.client()
    for _ in range(100):
        client.chat.completions.create(model="half", messages=MSG)
    sent = settled(shadowed, [half])[half] - before
    assert 30 <= sent <= 70, sent  # random request ids: outside only with p ~ 1e-4


def test_sample_key_user_mirrors_all_or_none_of_a_users_calls(shadowed):
    """`sample_key: user` at rate 0.5: a user's calls are all mirrored or none are."""
    sent = key("protege_shadow_mirrored_total", route="by-user", outcome="sent")
    before = settled(shadowed, [sent])[sent]
    client = shadowed.client()
    calls = {f"user-{i}": [] for i in range(8)}  # fixed users: the same split every run
    for _ in range(3):
        for user, ids in calls.items():
            ids.append(client.chat.completions.create(model="by-user", messages=MSG,
                                                      user=user).id)
    mirrored = settled(shadowed, [sent])[sent] - before
    every = [i for ids in calls.values() for i in ids]
    wait_until(lambda: len(stored(shadowed.store, every)) == mirrored, f"{mirrored} pairs")
    kept = stored(shadowed.store, every)
    per_user = {user: len(kept.intersection(ids)) for user, ids in calls.items()}
    # Sampled by request id, a user would get 1 or 2 of 3 with p = 3/4 each.
    assert set(per_user.values()) == {0, 3}, per_user


@pytest.mark.parametrize("route", ["hang", "fail", "down", "reset"])
def test_bad_teacher_leaves_the_user_untouched(shadowed, bad_teacher, route):
    outcome = "timeout" if route == "hang" else "failed"
    teacher_calls = key("protege_shadow_requests_total", route=route, outcome=outcome)
    before = settled(shadowed, [teacher_calls])[teacher_calls]
    client = shadowed.client()
    answered = {}  # prompt -> when its user had the whole answer
    for stream in (False, True, False):
        msg = unique_msg()
        started = time.monotonic()
        r = client.chat.completions.create(model=route, messages=msg, stream=stream)
        if stream:  # read to the last chunk
            assert "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        else:
            assert r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        answered[msg[0]["content"]] = done = time.monotonic()
        # The fake student answers in milliseconds; a user who waited for the teacher would
        # wait up to shadow.timeout_s.
        assert done - started < SHADOW_TIMEOUT_S / 2, (
            f"route {route}, stream={stream}: the user waited {done - started:.2f}s with "
            f"shadow.timeout_s={SHADOW_TIMEOUT_S}: the answer waited for the teacher")
    wait_for(shadowed, teacher_calls, before + 3, timeout_s=30)
    if route == "hang":
        hung = bad_teacher.hung
        wait_until(lambda: all(p in hung and hung[p][1] for p in answered),
                   "the gateway hanging up on each hanging teacher call")
        for prompt, done in answered.items():
            closed = hung[prompt][1]
            assert done < closed, (  # the user had the answer while the teacher call was open
                f"answered {done - closed:.2f}s after the gateway gave up on the teacher")


def test_remote_teacher_sees_the_marker_header(shadowed, bad_teacher):
    prompts = []
    for route in ("hang", "fail"):
        msg = unique_msg()
        shadowed.client().chat.completions.create(model=route, messages=msg)
        prompts.append(msg[0]["content"])
    wait_until(lambda: all(p in bad_teacher.marker for p in prompts), "both teacher calls")
    assert [bad_teacher.marker[p] for p in prompts] == ["1", "1"]
    # Leave no call hanging to time out during the next test.
    wait_until(lambda: bad_teacher.hung[prompts[0]][1], "the gateway giving up on /hang")


def test_resetting_teacher_was_really_reached(shadowed, resetting):
    before = resetting.resets
    shadowed.client().chat.completions.create(model="reset", messages=MSG)
    wait_until(lambda: resetting.resets > before, "a connection to the resetting teacher")


# --- feedback ----------------------------------------------------------------------------------


def post_feedback(gw, response_id, metric, value):
    with gw.http() as http:
        return http.post("/v1/feedback", json={"response_id": response_id, "metric": metric,
                                               "value": value})


def users_per_arm(route: str, arms, n: int) -> dict[str, list[str]]:
    """`n` users for each arm of `route`, placed by the gateway's own choice (`choose_arm`,
    salted with the route name)."""
    users = {variant: [] for variant, _ in arms}
    for i in range(10_000):
        user = f"{route}-user-{i}"
        arm = users[choose_arm(arms, user, route)]
        if len(arm) < n:
            arm.append(user)
        if all(len(u) == n for u in users.values()):
            return users
    raise AssertionError(f"arms never all got {n} users: {users}")


def test_feedback_on_shadowed_plain_and_ab_responses(shadowed):
    given = {v: key("protege_feedback_total", route="ab", variant=v, version=ver,
                    metric="thumbs_up") for v, ver in (("student", "s1"), ("student-b", "b1"))}
    summed = {v: key("protege_feedback_value_sum_total", route="ab", variant=v,
                     metric="thumbs_up") for v in given}
    rating = key("protege_feedback_value_sum_total", route="plain", metric="rating")
    before = settled(shadowed, [*given.values(), *summed.values(), rating])
    client = shadowed.client()
    shadowed_id = client.chat.completions.create(model="all", messages=MSG).id
    plain_id = client.chat.completions.create(model="plain", messages=MSG).id
    ab = []  # (arm, response): 3 users per arm, twice each
    for arm, users in users_per_arm("ab", AB_ARMS, 3).items():
        for user in users * 2:
            r = client.chat.completions.with_raw_response.create(model="ab", messages=MSG,
                                                                 user=user)
            assert r.headers["x-protege-variant"] == arm, (user, arm)  # sticky, as hashed
            ab.append((arm, r.parse().id))

    r = post_feedback(shadowed, shadowed_id, "thumbs_up", True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "feedback" and body["id"].startswith("fb-")
    assert body["response_id"] == shadowed_id and body["metric"] == "thumbs_up"
    assert post_feedback(shadowed, plain_id, "rating", 4.5).status_code == 200
    assert post_feedback(shadowed, plain_id, "note", "too long").status_code == 200
    for arm, rid in ab:
        assert post_feedback(shadowed, rid, "thumbs_up", arm == "student").status_code == 200

    stored_fb = {(f.response.response_id, f.metric): f for f in shadowed.store.iter_feedback()}
    assert stored_fb[(shadowed_id, "thumbs_up")].value == 1.0
    assert stored_fb[(shadowed_id, "thumbs_up")].response.route == "all"
    assert stored_fb[(plain_id, "rating")].value == 4.5
    assert stored_fb[(plain_id, "note")].comment == "too long"
    assert stored_fb[(plain_id, "note")].response.version == "s1"
    for arm, rid in ab:
        assert stored_fb[(rid, "thumbs_up")].response.variant == arm
    wait_for(shadowed, given["student-b"], before[given["student-b"]] + 6)
    wait_for(shadowed, given["student"], before[given["student"]] + 6)
    # Booleans sum as 1/0: the mean per arm is value_sum / total.
    wait_for(shadowed, summed["student"], before[summed["student"]] + 6)
    wait_for(shadowed, summed["student-b"], before[summed["student-b"]])
    wait_for(shadowed, rating, before[rating] + 4.5)


def test_feedback_comments_are_redacted(shadowed):
    rid = shadowed.client().chat.completions.create(model="plain", messages=MSG).id
    r = post_feedback(shadowed, rid, "note", "Wrong. Mail bob@example.com or call +49 30 7654321.")
    assert r.status_code == 200, r.text
    [kept] = [f for f in shadowed.store.iter_feedback() if f.response.response_id == rid]
    assert kept.comment == "Wrong. Mail [EMAIL] or call [PHONE]."


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
    ibans = key("protege_shadow_redactions_total", kind="iban")
    before = settled(shadowed, [ibans])[ibans]
    client = shadowed.client()
    secret = [{"role": "user", "content": "I am ann@example.com, IBAN DE89 3704 0044 0532 0130 "
                                          "00, call me on +49 30 1234567."}]
    shared = client.chat.completions.create(model="all", messages=secret).id
    private = client.chat.completions.create(model="private", messages=secret).id
    wait_for_pairs(shadowed.store, [shared, private])
    kept = shadowed.store.get(shared)
    assert kept.request["messages"][0]["content"] == "I am [EMAIL], IBAN [IBAN], call me on [PHONE]."
    bare = shadowed.store.get(private)
    assert "messages" not in bare.request and bare.teacher.text  # answers only
    for pair in (kept, bare):
        assert "ann@example.com" not in pair.to_json() and "1234567" not in pair.to_json()
    wait_for(shadowed, ibans, before + 1)  # the one stored prompt; the private one kept none


def test_classification_routes_score_label_agreement(shadowed):
    client = shadowed.client()
    labelled = client.chat.completions.create(model="classify", messages=MSG, temperature=0).id
    plain = client.chat.completions.create(model="all", messages=MSG, temperature=0).id
    wait_for_pairs(shadowed.store, [labelled, plain])
    # Greedy fake answers share their first words, so the first label agrees.
    assert shadowed.store.get(labelled).scores["label_agreement"] == 1.0
    assert shadowed.store.get(plain).scores["label_agreement"] is None
