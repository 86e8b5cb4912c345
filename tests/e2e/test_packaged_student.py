"""The packaged SmolLM2 student through llama.cpp behind the gateway, with examples/default.yaml:
answers, the teacher route, and mirroring to the packaged teacher down to `shadow report`."""

from __future__ import annotations

import pytest
import yaml

from ops.gateway import Gateway, wait_until
from tests.integration.conftest import REPO

pytestmark = pytest.mark.e2e

STUDENT = REPO / "models" / "student" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    if not STUDENT.exists():
        pytest.fail(f"{STUDENT} is missing: run `make models` (make test does it)")
    tmp = tmp_path_factory.mktemp("e2e")
    config = yaml.safe_load((REPO / "examples" / "default.yaml").read_text())
    config["shadow"].update(store_path=str(tmp / "pairs.sqlite"), spill_dir=str(tmp / "spill"),
                            max_in_flight=8)  # earlier tests' mirrors must not use the budget
    config["routes"]["student"]["shadow"]["sample_rate"] = 1.0  # every chat: no luck involved
    config["routes"]["unshadowed"] = {"variant": config["routes"]["student"]["variant"]}
    gw = Gateway(config, tmp, startup_s=300)
    gw.config = config
    gw.tmp = tmp
    yield gw
    gw.stop()


def test_student_answers_a_real_question(gateway):
    client = gateway.client()
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = client.chat.completions.create(model="student", messages=question, temperature=0,
                                       max_tokens=40)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer  # greedy: "The capital of France is Paris."
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 40
    stream = client.chat.completions.create(model="student", messages=question, temperature=0,
                                            max_tokens=40, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer


def test_teacher_route_serves_too(gateway):
    r = gateway.client().chat.completions.create(
        model="teacher", messages=[{"role": "user", "content": "Write the word hello."}],
        temperature=0, max_tokens=16)
    assert r.choices[0].message.content.strip()


def test_chats_are_mirrored_to_the_packaged_teacher_and_reported(gateway):
    import json
    import subprocess
    import sys

    from shadow.store import SqliteStore

    client = gateway.client()
    r = client.chat.completions.create(
        model="student", messages=[{"role": "user", "content": "Name a primary colour."}],
        temperature=0, max_tokens=24)
    store = SqliteStore(gateway.tmp / "pairs.sqlite")
    # Up to 3 minutes: the teacher answers on one niced thread.
    pair = wait_until(lambda: store.path.exists() and store.get(r.id), f"pair {r.id} stored",
                      180, 1, lambda: gateway.logs()[-3000:])
    assert pair.student.text == r.choices[0].message.content
    assert pair.teacher.model == "qwen-coder-0.5b" and pair.teacher.text.strip()
    assert pair.scores["semantic"] is not None  # the packaged MiniLM scored it
    assert 0.0 <= pair.disagreement <= 1.0
    assert pair.teacher_logprobs and len(pair.teacher_logprobs[0]["top"]) == 5

    config = gateway.tmp / "report.yaml"
    config.write_text(yaml.safe_dump(gateway.config))
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "shadow", "report", "--config", str(config), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    assert report["pairs"] >= 1 and report["routes"][0]["route"] == "student"
    assert report["worst"][0]["teacher"]


def test_the_student_answers_structured_and_calls_tools_through_the_sdk(gateway):
    """What the README's examples do, on the packaged student: parse() and a required call,
    whole and streamed (greedy, so the two agree). Through a route that mirrors nothing, so the
    teacher has no tool prompts to work through when the gateway stops."""
    from typing import Literal

    import openai
    from pydantic import BaseModel

    class Ticket(BaseModel):
        urgent: bool
        team: Literal["billing", "network", "account"]

    class GetWeather(BaseModel):
        city: str

    client = gateway.client()
    ticket = client.chat.completions.parse(
        model="unshadowed", response_format=Ticket, temperature=0, max_completion_tokens=60,
        messages=[{"role": "user", "content": "The VPN is down for everyone. File a ticket."}])
    assert isinstance(ticket.choices[0].message.parsed, Ticket)
    ask = dict(model="unshadowed", tools=[openai.pydantic_function_tool(GetWeather)],
               tool_choice="required", parallel_tool_calls=False, temperature=0,
               max_completion_tokens=60,
               messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    whole = client.chat.completions.create(**ask)
    (call,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "GetWeather"
    assert GetWeather.model_validate_json(call.function.arguments).city == "Paris"
    with client.chat.completions.stream(**ask) as stream:
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == (
        call.function.name, call.function.arguments)
