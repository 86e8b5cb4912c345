"""The `remote` engine end to end: a second gateway whose variant is the first gateway over HTTP."""

from __future__ import annotations

import json

import httpx
import pytest

from ops.gateway import Gateway, wait_until
from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture(scope="module")
def front(gateway, tmp_path_factory):
    upstream = {"engine": "remote", "base_url": gateway.base + "/v1",
                "api_key_env": "PROTEGE_TEST_UPSTREAM_KEY", "timeout_s": 10}
    config = {
        "server": {"ingress": {"replicas": 1, "num_cpus": 0}},
        "logging": {"log_prompts": True},
        "variants": {
            "reference": {"engine": {**upstream, "model": "fake"}, "num_cpus": 0},
            "missing": {"engine": {**upstream, "model": "no-such-route"}, "num_cpus": 0},
        },
        "routes": {"reference": {"variant": "reference"}, "missing": {"variant": "missing"}},
    }
    gw = Gateway(config, tmp_path_factory.mktemp("front"),
                 env={"PROTEGE_TEST_UPSTREAM_KEY": API_KEY})
    yield gw
    gw.stop()


def test_remote_answers_like_its_upstream(gateway, front):
    direct = gateway.client().chat.completions.create(model="fake", messages=MSG, temperature=0,
                                                      max_tokens=7)
    via = front.client().chat.completions.create(model="reference", messages=MSG,
                                                 temperature=0, max_tokens=7)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.choices[0].finish_reason == "length"
    assert via.usage.model_dump() == direct.usage.model_dump()
    streamed = front.client().chat.completions.create(model="reference", messages=MSG,
                                                      temperature=0, max_tokens=7, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == direct.choices[0].message.content


def test_upstream_failure_is_a_bounded_502(front):
    r = httpx.post(front.base + "/v1/chat/completions",
                   json={"model": "missing", "messages": MSG}, timeout=30)
    assert r.status_code == 502
    error = r.json()["error"]
    assert error["type"] == "server_error" and "127.0.0.1" not in error["message"]
    assert front.client().models.list().data  # still serving


def test_log_prompts_puts_prompt_and_answer_in_the_log_line(front):
    r = front.client().chat.completions.create(model="reference", messages=MSG, max_tokens=3)
    (line,) = wait_until(lambda: [json.JSONDecoder().raw_decode(line[line.index("{"):])[0]
                                  for line in front.logs().splitlines()
                                  if r.id in line and "completed" in line],
                         f"completed log line of {r.id}", 20)
    assert line["prompt"] == MSG
    assert line["answers"] == {"0": r.choices[0].message.content}
