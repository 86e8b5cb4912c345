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
            await asyncio.sleep(20)
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
                   "timeout_s": 2, "semantic_model": None, "max_pending": 200},
        "variants": {
            "student": {"engine": {"engine": "fake", "completion_tokens": 8}, "num_cpus": 0,
                        "version": "s1"},
            "teacher": {"engine": {"engine": "fake", "completion_tokens": 10}, "num_cpus": 0,
                        "version": "t1"},
        },
        "routes": {
            "all": {"variant": "student", "shadow": {"variant": "teacher", "sample_rate": 1}},
            "half": {"variant": "student", "shadow": {"variant": "teacher", "sample_rate": 0.5}},
            "plain": {"variant": "student"},
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
        assert pair.request["messages"] == MSG
        assert 0.0 <= pair.disagreement <= 1.0
        assert pair.student.latency_ms > 0 and pair.teacher.latency_ms > 0
    wait_for_metric(shadowed, "protege_shadow_mirrored_total", 6, route="all", outcome="sent")
    wait_for_metric(shadowed, "protege_shadow_records_total", 6, outcome="stored")


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
        assert scrape(shadowed, "protege_shadow_teacher_calls_total", route=route,
                      outcome="timeout") < 3
    outcome = "timeout" if route == "hang" else "failed"
    wait_for_metric(shadowed, "protege_shadow_teacher_calls_total", 3, route=route,
                    outcome=outcome, timeout_s=30)


def test_remote_teacher_sees_the_marker_header(bad_teacher):
    assert bad_teacher.seen_marker >= 6  # every call to /hang and /fail carried it


def test_resetting_teacher_was_really_reached(resetting):
    assert resetting.resets >= 3
