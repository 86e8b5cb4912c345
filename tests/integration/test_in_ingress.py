"""Variants served inside the ingress (`in_ingress`): the same answers as a deployed variant,
one engine in each ingress replica, Ray Serve's limits kept, and aborts when clients leave."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import API_KEY, FAKE_CONFIG, wait_for_metric

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "Tell me about the sea."}]
AUTH = {"authorization": f"Bearer {API_KEY}"}


def test_an_in_ingress_variant_answers_as_a_deployed_one(gateway):
    client = gateway.client()
    answers = {}
    for route in ("fake", "inline"):  # the same fake engine, deployed and in the ingress
        whole = client.chat.completions.create(model=route, messages=MSG, temperature=0)
        streamed = client.chat.completions.create(model=route, messages=MSG, temperature=0,
                                                  stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == whole.choices[0].message.content
        answers[route] = (text, whole.usage.model_dump(), whole.choices[0].finish_reason)
    assert answers["inline"] == answers["fake"]
    # One engine in each of the two ingress replicas, none deployed on its own.
    replicas = FAKE_CONFIG["server"]["ingress"]["replicas"]
    wait_for_metric(gateway, "protege_engine_replica_up", replicas, variant="inline",
                    version="i1")
    assert "variant-inline" not in gateway.logs()
    assert "variant-fake" in gateway.logs()


def test_an_in_ingress_variant_keeps_its_limits_and_aborts(gateway):
    """max_ongoing_requests 1, max_queued_requests 0 in each ingress replica: of three slow
    streams at once over two replicas, one finds its replica's slot taken and gets a 503."""
    body = {"model": "inline-slow", "messages": MSG, "stream": True}
    all_answered = threading.Barrier(3, timeout=30)  # every stream stays open until then

    def first_line(_) -> tuple[int, bytes]:
        with httpx.stream("POST", gateway.base + "/v1/chat/completions", json=body,
                          headers=AUTH, timeout=30) as r:
            chunks = r.iter_bytes()  # held: dropping it would close the stream
            text = next(chunks) if r.status_code == 200 else r.read()
            all_answered.wait()
            return r.status_code, text

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(first_line, range(3)))
    statuses = sorted(status for status, _ in results)
    assert statuses[0] == 200 and statuses[-1] == 503, results
    refused = next(text for status, text in results if status == 503)
    assert b"server_busy" in refused, refused
    # The streams that started left at once: their generations were aborted, slots freed.
    started = statuses.count(200)
    wait_for_metric(gateway, "protege_engine_generations_total", started, timeout_s=30,
                    variant="inline-slow", outcome="aborted")
    wait_for_metric(gateway, "protege_engine_generations_active", 0, variant="inline-slow")
    # A non-streaming client that gives up aborts its generation too.
    with gateway.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={"model": "inline-slow", "messages": MSG},
                  timeout=1.5)
    wait_for_metric(gateway, "protege_engine_generations_total", started + 1, timeout_s=30,
                    variant="inline-slow", outcome="aborted")
