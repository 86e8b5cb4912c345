"""Every rejection: the right status, OpenAI's error body with `param`, and the server lives on."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "hi"}]


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert len(r.content) < 4096
    return body["error"]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": 5}, "model"),
    ],
)
def test_invalid_values_are_400_with_param(gateway, patch, param):
    with gateway.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "fake", "messages": MSG, **patch})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_context_window_overflow_is_400(gateway):
    with gateway.http() as http:
        r = http.post("/v1/chat/completions",
                      json={"model": "fake", "messages": MSG, "max_tokens": 1000})
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"


def test_invalid_json_and_non_object(gateway):
    with gateway.http() as http:
        for raw in (b"{not json", b"[1, 2]", b""):
            r = http.post("/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"})
            assert r.status_code == 400, raw
            error_of(r)


def test_auth(gateway):
    body = {"model": "fake", "messages": MSG}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        r = httpx.post(gateway.base + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401
        assert error_of(r)["type"] == "authentication_error"
    assert httpx.get(gateway.base + "/v1/models").status_code == 401
    assert httpx.get(gateway.base + "/health").status_code == 200


def test_unknown_route_is_404(gateway):
    with gateway.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "nope", "messages": MSG})
    assert r.status_code == 404 and error_of(r)["param"] == "model"


def test_body_over_limit_is_413(gateway):
    big = {"model": "fake", "messages": [{"role": "user", "content": "x" * 70_000}]}
    with gateway.http() as http:
        r = http.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    error_of(r)


def test_wrong_content_type_is_415(gateway):
    with gateway.http() as http:
        r = http.post("/v1/chat/completions", content=json.dumps({"model": "fake"}),
                      headers={"content-type": "text/plain"})
    assert r.status_code == 415
    error_of(r)


def test_full_queue_is_503_with_retry_after(gateway):
    body = {"model": "narrow", "messages": MSG}

    def post(_):
        with gateway.http() as http:
            return http.post("/v1/chat/completions", json=body)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(post, range(6)))
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in results if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 0
    error_of(busy)


def test_timeout_is_408(gateway):
    with gateway.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "hang", "messages": MSG})
    assert r.status_code == 408
    error_of(r)


def test_still_serving_after_bad_input(gateway):
    r = gateway.client().chat.completions.create(model="fake", messages=MSG)
    assert r.choices[0].message.content
