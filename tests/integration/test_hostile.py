"""The running gateway under hostile input: what an attacker or a careless operator sends.

One key-less gateway on loopback (fake student, review page, feedback) mirrors a route to a
hostile teacher: an upstream that answers with personal data and secrets, in its text and in
its logprobs (alternatives included), or with a lone surrogate; another route's teacher hangs.
Its mirror ledger cannot be written (a file stands where its folder should be, as a full disk
would fail it). Checked:
every bad body is a 400 naming the field, never a 5xx; no raw personal data in any file under
the data directory or in the logs; the ledger's failures are counted and cost no answer; the
hanging teacher costs only its own route; the gateway keeps serving. And `protege serve` on a
public address without keys exits 2 before starting anything. (Manifests that point outside
the registry are refused by a running gateway in test_promotion_failures.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from ops.gateway import Gateway, wait_until
from shadow.store import SqliteStore
from tests.integration.conftest import REPO, scrape
from tests.oracle import serve_app

pytestmark = pytest.mark.integration

# What must never be stored or logged as it was sent.
RAW = ("jane.doe@example.com", "4111 1111 1111 1111", "123-45-6789", "bob.smith@example.org",
       "sk-proj-AAAABBBBCCCCDDDDEEEEFFFF1234", "AKIAIOSFODNN7EXAMPLE", "carol@example.net")
TEACHER_SAYS = "Reach jane.doe@example.com or card 4111 1111 1111 1111, SSN 123-45-6789."
PROMPT = "I am bob.smith@example.org, my key is sk-proj-AAAABBBBCCCCDDDDEEEEFFFF1234."


async def hanging(request: Request):
    """A teacher that takes far longer than the shadow's timeout (bounded all the same)."""
    await asyncio.sleep(30)
    return StreamingResponse(iter(["data: [DONE]\n\n"]), media_type="text/event-stream")


async def teacher(request: Request):
    """Streams its answer word by word, each with logprobs and an alternative that leaks a
    key; a prompt with POISON gets a lone surrogate in the answer."""
    body = await request.json()
    poison = "POISON" in body["messages"][-1]["content"]
    words = ["bad \ud800 text"] if poison else [w + " " for w in TEACHER_SAYS.split(" ")]
    words[-1] = words[-1].rstrip()

    async def events():
        for word in words:
            lp = {"token": word, "logprob": -0.1, "top_logprobs": [
                {"token": word, "logprob": -0.1}, {"token": " AKIAIOSFODNN7EXAMPLE",
                                                   "logprob": -4.0}]}
            chunk = {"choices": [{"index": 0, "delta": {"content": word},
                                  "logprobs": {"content": [lp]}}]}
            yield f"data: {json.dumps(chunk)}\n\n"  # ensure_ascii: a lone surrogate as \ud800
        yield 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    app = Starlette(routes=[Route("/v1/chat/completions", teacher, methods=["POST"]),
                            Route("/hang/chat/completions", hanging, methods=["POST"])])
    with serve_app(app) as upstream:
        config = {
            "server": {"ingress": {"replicas": 1, "num_cpus": 0}, "request_timeout_s": 20},
            "shadow": {"store_path": str(tmp / "data" / "pairs.sqlite"),
                       "spill_dir": str(tmp / "data" / "spill"), "semantic_model": None,
                       "max_in_flight": 2, "max_concurrency": 1, "max_pending": 2,
                       "timeout_s": 8},
            "variants": {"student": {"engine": {"engine": "fake", "completion_tokens": 6},
                                     "num_cpus": 0}},
            "feedback": {"note": {"type": "comment"}},
            "routes": {
                "student": {"variant": "student"},
                "mirrored": {"variant": "student", "shadow": {"sample_rate": 1, "remote": {
                    "engine": "remote", "base_url": upstream, "model": "t", "timeout_s": 10}}},
                "stuck": {"variant": "student", "shadow": {"sample_rate": 1, "remote": {
                    "engine": "remote", "base_url": upstream.replace("/v1", "/hang"),
                    "model": "t", "timeout_s": 10}}},
            },
        }
        (tmp / "data" / "spill").mkdir(parents=True)
        (tmp / "data" / "spill" / "ledger").write_text("")  # no folder: every write fails
        gw = Gateway(config, tmp)
        gw.data = tmp / "data"
        gw.statuses = []
        yield gw
        gw.stop()
    assert all(s < 500 for s in gw.statuses), gw.statuses


def post(gw, path: str, content: bytes | str, **headers) -> httpx.Response:
    with gw.http() as http:
        r = http.post(path, content=content, headers={"content-type": "application/json",
                                                        **headers})
    gw.statuses.append(r.status_code)
    return r


def chat(gw, route: str, text: str) -> str:
    r = post(gw, "/v1/chat/completions", json.dumps(
        {"model": route, "messages": [{"role": "user", "content": text}], "max_tokens": 6}))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def stored_pair(gw, pair_id: str):
    store = SqliteStore(gw.data / "pairs.sqlite")
    return wait_until(lambda: (gw.data / "pairs.sqlite").exists() and store.get(pair_id),
                      f"pair {pair_id} stored", 60, 0.3, gw.logs)


def assert_400(r: httpx.Response, param: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_personal_data_and_secrets_never_reach_a_file_or_a_log(hostile):
    pair = stored_pair(hostile, chat(hostile, "mirrored", PROMPT))
    assert pair.teacher.text == "Reach [EMAIL] or card [CARD], SSN [SSN]."
    assert pair.request["messages"][0]["content"] == "I am [EMAIL], my key is [SECRET]."
    assert [e["token"] for e in pair.teacher_logprobs] == ["Reach "]  # cut at the e-mail
    assert pair.teacher_logprobs[0]["top"][1][0] == " [SECRET]"
    r = post(hostile, "/v1/feedback", json.dumps(
        {"response_id": pair.pair_id, "metric": "note", "value": "mail carol@example.net"}))
    assert r.status_code == 200, r.text
    r = post(hostile, f"/review/api/pairs/{pair.pair_id}/label", json.dumps(
        {"verdict": "both_wrong", "reviewer": "ana", "corrected": "Mail carol@example.net"}))
    assert r.status_code == 201, r.text
    assert r.json()["label"]["corrected"] == "Mail [EMAIL]"
    store = SqliteStore(hostile.data / "pairs.sqlite")
    (feedback,) = wait_until(lambda: list(store.iter_feedback()), "stored feedback", 30, 0.3)
    assert feedback.comment == "mail [EMAIL]"
    assert [label.corrected for label in store.iter_labels()] == ["Mail [EMAIL]"]
    files = [p for p in Path(hostile.data).rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for raw in RAW:
            assert raw.encode() not in data, (raw, path)
    logs = hostile.logs()
    assert not [raw for raw in RAW if raw in logs]


def test_a_poison_teacher_answer_is_stored_clean_and_costs_nothing_else(hostile):
    poisoned = chat(hostile, "mirrored", "POISON please")
    fine = chat(hostile, "mirrored", "hello")
    assert stored_pair(hostile, poisoned).teacher.text == "bad \ufffd text"
    assert stored_pair(hostile, fine).teacher.text.startswith("Reach [EMAIL]")


@pytest.mark.parametrize("path", ["/v1/feedback", "/review/api/pairs/p/label"])
def test_bodies_nested_too_deeply_are_400s(hostile, path):
    error = assert_400(post(hostile, path, "[" * 2000 + "]" * 2000))
    assert "nested too deeply" in error["message"]


def test_text_no_store_can_keep_is_a_400_naming_the_field(hostile):
    response_id = chat(hostile, "student", "hi")
    for value in ("\\ud800", "\\u0000"):
        body = ('{"response_id": "%s", "metric": "note", "value": "a %s b"}'
                % (response_id, value))
        assert_400(post(hostile, "/v1/feedback", body), "value")
    pair_id = chat(hostile, "mirrored", "hello again")
    stored_pair(hostile, pair_id)
    body = '{"verdict": "student", "reviewer": "ana", "corrected": "x \\udfff"}'
    assert_400(post(hostile, f"/review/api/pairs/{pair_id}/label", body), "corrected")


def test_a_request_for_another_host_is_refused(hostile):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 cannot use the gateway."""
    body = json.dumps({"model": "student", "messages": [{"role": "user", "content": "hi"}]})
    for path in ("/v1/chat/completions", "/health", "/review"):
        error = assert_400(post(hostile, path, body, host="evil.example:8000"))
        assert error["code"] == "invalid_host"
    chat(hostile, "student", "still serving")


def test_a_ledger_that_cannot_be_written_costs_no_answer(hostile):
    before = scrape(hostile, "protege_shadow_ledger_errors_total")
    with hostile.client().chat.completions.create(
            model="mirrored", messages=[{"role": "user", "content": "stream it"}],
            max_tokens=6, stream=True) as stream:
        chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")  # a whole stream
    pair_id = chunks[0].id
    assert stored_pair(hostile, pair_id).teacher.text.startswith("Reach")  # mirrored all the same
    assert scrape(hostile, "protege_shadow_ledger_errors_total") > before


def test_a_hanging_teacher_costs_only_its_own_route(hostile):
    """Both routes mirror every request; the stuck one's teacher never answers in time. Its
    budget runs out (drops counted on it), the healthy route's pairs all arrive."""
    stuck = [chat(hostile, "stuck", f"wait {i}") for i in range(6)]
    for i in range(4):  # one at a time, within the stuck teacher's 8 s timeout
        pair = stored_pair(hostile, chat(hostile, "mirrored", f"fine {i}"))
        assert pair.teacher.text.startswith("Reach")
    assert scrape(hostile, "protege_shadow_mirrored_total", route="stuck", outcome="budget") >= 1
    assert scrape(hostile, "protege_shadow_mirrored_total", route="mirrored",
                  outcome="budget") == 0
    assert len(stuck) == 6  # and every user had an answer at once


def test_a_public_bind_without_keys_is_refused_before_anything_starts(hostile):
    env = {k: v for k, v in os.environ.items() if k not in ("PROTEGE_API_KEYS", "RAY_ADDRESS")}
    command = [sys.executable, "-m", "ops.cli", "serve", "--config", str(hostile.config_path),
               "--host", "0.0.0.0", "--port", "0"]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "refusing to serve: no API keys" in out.stderr
