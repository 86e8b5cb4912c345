"""Metrics across replicas, client disconnects, and draining on SIGTERM."""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

from ops.gateway import Gateway, wait_until
from tests.integration.conftest import FAKE_CONFIG, scrape, settled, wait_for_metric

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "hi"}]


def test_metrics_sum_over_replicas(gateway):
    client = gateway.client()
    counters = {  # (metric, labels) -> what each request adds
        ("protege_requests_total", (("route", "counted"), ("status", "200"))): 1,
        ("protege_tokens_total", (("route", "counted"), ("kind", "completion"))): 5,
        ("protege_request_duration_seconds_count", (("route", "counted"),)): 1,
        ("protege_engine_generations_total", (("variant", "counted"),
                                              ("outcome", "completed"))): 1,
    }
    before = settled(gateway, counters)
    sent = 24
    for i in range(sent):
        client.chat.completions.create(model="counted", messages=MSG, stream=i % 2 == 0)
    text = httpx.get(gateway.base + "/metrics").text  # open without a key, for scrapers
    assert "protege_requests_total" in text
    for key, per_request in counters.items():
        wait_for_metric(gateway, key[0], before[key] + sent * per_request, **dict(key[1]))
    # Both ingress replicas and both variant replicas reported.
    assert scrape(gateway, "protege_engine_replica_up", variant="counted") == 2
    text = httpx.get(gateway.base + "/metrics").text
    for name in ("protege_time_to_first_token_seconds_bucket",
                 "protege_inter_token_latency_seconds_bucket", "protege_requests_in_flight",
                 "protege_engine_queue_depth"):
        assert re.search(rf"^{name}", text, re.M), name


def test_client_disconnect_aborts_generation(gateway):
    body = {"model": "slow", "messages": MSG, "stream": True}
    with gateway.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    # 2000 tokens at 50 ms would take 100 s; the abort must come long before.
    wait_for_metric(gateway, "protege_engine_generations_total", 1, timeout_s=30,
                    variant="slow", outcome="aborted")
    wait_for_metric(gateway, "protege_engine_generations_active", 0, variant="slow")
    # A non-streaming client that gives up aborts its generation too.
    with gateway.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={"model": "slow", "messages": MSG}, timeout=1.5)
    wait_for_metric(gateway, "protege_engine_generations_total", 2, timeout_s=30,
                    variant="slow", outcome="aborted")
    wait_for_metric(gateway, "protege_engine_generations_active", 0, variant="slow")


def test_canonical_log_line_per_request(gateway):
    r = gateway.client().chat.completions.create(model="fake", messages=MSG)
    (line,) = wait_until(lambda: [json.JSONDecoder().raw_decode(line[line.index("{"):])[0]
                                  for line in gateway.logs().splitlines()
                                  if '"serving.request.completed"' in line and r.id in line],
                         "serving.request.completed line in the gateway log", 20, 0.5)
    for field in ("request_id", "route", "variant", "version", "status", "latency_ms",
                  "ttft_ms", "prompt_tokens", "completion_tokens"):
        assert field in line, field
    assert line["status"] == 200 and line["completion_tokens"] == 12
    assert "prompt" not in line and "answers" not in line  # text only with logging.log_prompts


def test_sigterm_drains_in_flight_stream(tmp_path):
    config = {**FAKE_CONFIG, "server": {**FAKE_CONFIG["server"], "request_timeout_s": 60,
                                        "ingress": {"replicas": 1, "num_cpus": 0}}}
    config["variants"] = {"steady": {"engine": {"engine": "fake", "completion_tokens": 40,
                                                "token_delay_s": 0.1}, "num_cpus": 0}}
    config["routes"] = {"steady": {"variant": "steady"}}
    gw = Gateway(config, tmp_path)
    events: list[str] = []
    started = threading.Event()

    def consume():
        body = {"model": "steady", "messages": MSG, "stream": True}
        with httpx.stream("POST", gw.base + "/v1/chat/completions", json=body,
                          timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(30)
    code = gw.stop()
    reader.join(60)
    assert events[-1] == "data: [DONE]", gw.logs()
    assert code == 0, gw.logs()
    assert "protege: stopped" in gw.logs()


def test_refused_requests_are_counted(gateway):
    keys = {"400": {"model": "fake", "messages": []}, "404": {"model": "nope", "messages": MSG}}
    before = settled(gateway, [("protege_requests_total", (("route", "-"), ("status", s)))
                               for s in keys])
    before = {s: before[("protege_requests_total", (("route", "-"), ("status", s)))]
              for s in keys}
    with gateway.http() as http:
        for status, body in keys.items():
            assert http.post("/v1/chat/completions", json=body).status_code == int(status)
    for status in keys:
        wait_for_metric(gateway, "protege_requests_total", before[status] + 1, route="-",
                        status=status)
