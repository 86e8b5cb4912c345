"""Structured outputs through the real gateway and the official SDK.

The gateway serves a tiny random llama GGUF (llama.cpp, built in code), the fake engine, and a
remote upstream that ignores `response_format` (the test oracle). The random model answers
valid JSON and valid tool calls only because decoding is constrained; the SDK's `parse()` and
`stream()` rebuild a validated Pydantic object (or the calls) from it.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from pydantic import BaseModel, Field

from ops.gateway import Gateway, wait_until
from serving.engines.structured import check_answer, parse_response_format
from tests.integration.conftest import scrape, wait_for_metric
from tests.oracle import Oracle, serve_oracle
from tests.unit.test_engine_llamacpp import write_tiny_gguf

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "File a ticket for the outage."}]
LABELS = ["billing", "network", "account"]


class Ticket(BaseModel):
    urgent: bool
    team: Literal["billing", "network", "account"]
    priority: int = Field(ge=1, le=4)


@pytest.fixture(scope="module")
def oracle():
    return Oracle()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, oracle):
    tmp = tmp_path_factory.mktemp("structured")
    gguf = write_tiny_gguf(tmp / "tiny.gguf")
    teacher = write_tiny_gguf(tmp / "teacher.gguf", seed=1)
    with serve_oracle(oracle) as upstream:
        config = {
            "server": {"ingress": {"replicas": 1, "num_cpus": 0}, "request_timeout_s": 60},
            "shadow": {"store_path": str(tmp / "pairs.sqlite"), "spill_dir": str(tmp / "spill"),
                       "semantic_model": None},
            "variants": {
                "tiny": {"engine": {"engine": "llamacpp", "path": str(gguf), "n_ctx": 2048,
                                    "n_threads": 1}, "num_cpus": 0},
                "tiny-teacher": {"engine": {"engine": "llamacpp", "path": str(teacher),
                                            "n_ctx": 2048, "n_threads": 1}, "num_cpus": 0},
                "fake": {"engine": {"engine": "fake"}, "num_cpus": 0},
                "upstream": {"engine": {"engine": "remote", "base_url": upstream,
                                        "model": "dunce", "timeout_s": 10}, "num_cpus": 0},
            },
            "routes": {"tiny": {"variant": "tiny"}, "fake": {"variant": "fake"},
                       "upstream": {"variant": "upstream"},
                       "triage": {"variant": "tiny", "labels": LABELS, "constrain": True},
                       "shadowed": {"variant": "tiny", "shadow": {"variant": "tiny-teacher",
                                                                  "sample_rate": 1}}},
        }
        gateway = Gateway(config, tmp)
        gateway.store_path = tmp / "pairs.sqlite"
        yield gateway
        gateway.stop()


def test_sdk_parse_returns_a_validated_object(gw):
    client = gw.client()
    for seed in range(3):
        done = client.chat.completions.parse(model="tiny", messages=MSG, response_format=Ticket,
                                             seed=seed, max_completion_tokens=120)
        choice = done.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Ticket)
        assert Ticket.model_validate_json(choice.message.content) == choice.message.parsed
    beta = client.beta.chat.completions.parse(model="tiny", messages=MSG, response_format=Ticket,
                                              seed=9, max_completion_tokens=120)
    assert isinstance(beta.choices[0].message.parsed, Ticket)


def test_sdk_stream_accumulates_a_validated_object(gw):
    with gw.client().chat.completions.stream(model="tiny", messages=MSG, response_format=Ticket,
                                             seed=4, max_completion_tokens=120) as stream:
        pieces = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(pieces) > 3  # streamed, not one block
    assert isinstance(final.choices[0].message.parsed, Ticket)
    assert "".join(pieces) == final.choices[0].message.content


def test_every_choice_conforms_and_the_gateway_says_so(gw):
    schema = {**Ticket.model_json_schema(), "additionalProperties": False}  # else keys go on
    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "strict": True,
                                                  "schema": schema}}
    before = scrape(gw, "protege_structured_outputs_total", route="tiny", outcome="valid")
    with gw.http() as http:
        r = http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": MSG, "n": 3, "response_format": fmt,
            "max_completion_tokens": 120})
        assert r.status_code == 200, r.text
        assert r.headers["x-protege-format-valid"] == "true", r.text
        checked = parse_response_format(fmt)
        for choice in r.json()["choices"]:
            assert check_answer(checked, choice["message"]["content"]) is None
        obj = http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": MSG, "response_format": {"type": "json_object"},
            "max_completion_tokens": 200, "temperature": 0})
        assert obj.status_code == 200
        answer = obj.json()["choices"][0]
        if answer["finish_reason"] == "stop":
            assert isinstance(json.loads(answer["message"]["content"]), dict)
        else:  # an object the random model had not closed within the budget
            assert obj.headers["x-protege-format-valid"] == "false"
        plain = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG,
                                                        "max_completion_tokens": 5})
        assert "x-protege-format-valid" not in plain.headers
    wait_for_metric(gw, "protege_structured_outputs_total", before + 3, route="tiny",
                    outcome="valid")


class Customer(BaseModel):
    name: str = Field(min_length=1, max_length=8)
    vip: bool


class Line(BaseModel):
    sku: Literal["A1", "B2", "C3"]
    qty: int = Field(ge=1, le=9)


class Order(BaseModel):  # nested objects, an array, enums; parse() sends it strict (every key
    # required, additionalProperties: false at every level)
    customer: Customer
    lines: list[Line] = Field(min_length=1, max_length=3)
    status: Literal["new", "paid"]


def test_a_nested_schema_is_honoured_streamed_and_not(gw):
    client = gw.client()
    for seed in range(2):
        whole = client.chat.completions.parse(model="tiny", messages=MSG, response_format=Order,
                                              seed=seed, max_completion_tokens=400)
        with client.chat.completions.stream(model="tiny", messages=MSG, response_format=Order,
                                            seed=seed, max_completion_tokens=400) as stream:
            streamed = stream.get_final_completion()
        assert isinstance(whole.choices[0].message.parsed, Order)
        assert streamed.choices[0].message.parsed == whole.choices[0].message.parsed  # seeded


@pytest.mark.parametrize("fmt, param, words", [
    ({"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "array", "uniqueItems": True}}}, "response_format.json_schema.schema",
     "'uniqueItems' cannot be enforced"),
    ({"type": "yaml"}, "response_format.type", "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "strng"}}},
     "response_format.json_schema.schema", "not a valid JSON Schema"),
])
def test_what_cannot_be_enforced_is_a_400_naming_it(gw, fmt, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        gw.client().chat.completions.create(model="tiny", messages=MSG, response_format=fmt)
    assert e.value.body["param"] == param and words in e.value.body["message"]


def test_an_engine_that_cannot_constrain_refuses(gw):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            gw.client().chat.completions.create(model="fake", messages=MSG, stream=stream,
                                                response_format={"type": "json_object"})
        assert e.value.body["param"] == "response_format"


def test_a_remote_upstream_gets_the_format_and_its_answer_is_checked_not_rewritten(gw, oracle):
    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": {
        "type": "object", "properties": {"urgent": {"type": "boolean"}}}}}
    r = httpx.post(gw.base + "/v1/chat/completions", timeout=30, json={
        "model": "upstream", "messages": MSG, "response_format": fmt})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "Sorry, no idea."  # as sent
    assert r.headers["x-protege-format-valid"] == "false"
    assert oracle.bodies[-1]["response_format"] == fmt
    wait_for_metric(gw, "protege_structured_outputs_total", 1, route="upstream",
                    outcome="invalid")
    streamed = gw.client().chat.completions.create(model="upstream", messages=MSG, stream=True,
                                                   response_format=fmt)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "Sorry, no idea."
    wait_for_metric(gw, "protege_structured_outputs_total", 2, route="upstream",
                    outcome="invalid")


def test_a_label_route_answers_exactly_one_label(gw):
    client = gw.client()
    answers = {client.chat.completions.create(model="triage", messages=MSG, seed=s)
               .choices[0].message.content for s in range(5)}
    streamed = client.chat.completions.create(model="triage", messages=MSG, seed=9, stream=True)
    answers.add("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))
    assert answers <= set(LABELS)
    completion = client.completions.create(model="triage", prompt="Ticket: VPN down.", seed=1)
    assert completion.choices[0].text in LABELS
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="triage", messages=MSG,
                                       response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"


def test_a_label_route_gives_label_probabilities_when_asked_for_logprobs(gw):
    client = gw.client()
    plain = client.chat.completions.create(model="triage", messages=MSG, seed=1)
    assert "label_probs" not in (plain.choices[0].model_extra or {})
    done = client.chat.completions.create(model="triage", messages=MSG, seed=1, logprobs=True, n=2)
    probs = done.choices[0].model_extra["label_probs"]
    assert list(probs) == LABELS and sum(probs.values()) == pytest.approx(1.0)
    assert done.choices[1].model_extra["label_probs"] == pytest.approx(probs)  # one prompt
    streamed = [c for c in client.chat.completions.create(
        model="triage", messages=MSG, seed=1, logprobs=True, stream=True) if c.choices]
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert streamed[-1].choices[0].model_extra["label_probs"] == pytest.approx(probs)
    assert all("label_probs" not in (c.choices[0].model_extra or {}) for c in streamed[:-1])
    legacy = client.completions.create(model="triage", prompt="Ticket: VPN down.", logprobs=1)
    assert set(legacy.choices[0].model_extra["label_probs"]) == set(LABELS)


def stored_pair(gw, pair_id: str):
    """The pair the shadow stores for `pair_id` (waits up to a minute for it)."""
    from shadow.store import SqliteStore

    return wait_until(lambda: gw.store_path.exists() and SqliteStore(gw.store_path).get(pair_id),
                      f"pair {pair_id} stored", 60, 0.5, gw.logs)


def test_a_mirrored_structured_request_is_scored_for_its_structure(gw):
    from shadow.report import summarize

    fmt = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": {
        **Ticket.model_json_schema(), "additionalProperties": False}}}
    r = gw.client().chat.completions.create(model="shadowed", messages=MSG, seed=3,
                                            response_format=fmt, max_completion_tokens=120)
    pair = stored_pair(gw, r.id)
    assert pair.request["params"]["response_format"] == fmt  # the teacher had the same format
    assert pair.scores["student_format_valid"] == pair.scores["teacher_format_valid"] == 1.0
    assert pair.scores["format_agreement"] == 1.0
    assert 0.0 <= pair.scores["field_agreement_normalized"] <= 1.0
    assert Ticket.model_validate_json(pair.teacher.text)
    route = next(x for x in summarize([pair], [])["routes"] if x["route"] == "shadowed")
    assert route["structured"]["pairs"] == 1


# -- tools ----------------------------------------------------------------------------------------


class GetWeather(BaseModel):
    city: Literal["Paris", "Rome"]
    celsius: bool


WEATHER_MSG = [{"role": "user", "content": "Weather in Paris?"}]


def test_a_tool_call_comes_back_whole_and_streamed_as_the_sdk_accumulates_it(gw):
    client = gw.client()
    tools = [openai.pydantic_function_tool(GetWeather)]  # strict: additionalProperties false
    whole = client.chat.completions.create(model="tiny", messages=WEATHER_MSG, tools=tools,
                                           tool_choice="required", parallel_tool_calls=False,
                                           seed=5, max_completion_tokens=300)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "GetWeather" and call.id.startswith("call_")
    GetWeather.model_validate_json(call.function.arguments)
    with client.chat.completions.stream(model="tiny", messages=WEATHER_MSG, tools=tools,
                                        tool_choice="required", parallel_tool_calls=False,
                                        seed=5, max_completion_tokens=300) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert len(done) == 1 and isinstance(done[0].parsed_arguments, GetWeather)
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    got = streamed.message.tool_calls[0].function
    assert (got.name, got.arguments) == (call.function.name, call.function.arguments)  # seeded
    named = client.chat.completions.create(
        model="tiny", messages=WEATHER_MSG, tools=tools, seed=1, max_completion_tokens=300,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "GetWeather"


class GetTime(BaseModel):
    zone: Literal["UTC", "CET"]


def test_parallel_and_auto_calls_are_valid_and_streamed_as_the_sdk_accumulates_them(gw):
    client = gw.client()
    models = {"GetWeather": GetWeather, "GetTime": GetTime}
    tools = [openai.pydantic_function_tool(m) for m in models.values()]
    for choice in ("required", "auto"):
        for seed in range(3):
            ask = {"model": "tiny", "messages": WEATHER_MSG, "tools": tools, "seed": seed,
                   "tool_choice": choice, "max_completion_tokens": 200}
            whole = client.chat.completions.create(**ask).choices[0]
            state = ChatCompletionStreamState()  # the SDK's accumulator (its stream() would
            for chunk in client.chat.completions.create(**ask, stream=True):  # raise at length)
                state.handle_chunk(chunk)
            streamed = state.current_completion_snapshot.choices[0]
            calls = whole.message.tool_calls or []
            assert [(c.function.name, c.function.arguments) for c in calls] == [
                (c.function.name, c.function.arguments)
                for c in streamed.message.tool_calls or []]
            assert whole.finish_reason == streamed.finish_reason
            if whole.finish_reason == "tool_calls":
                assert calls and len({c.id for c in calls}) == len(calls)
                for c in calls:
                    models[c.function.name].model_validate_json(c.function.arguments)
            else:  # auto answered in text, or a run of calls hit the budget
                assert whole.finish_reason == "length" or choice == "auto"


def test_a_tool_result_turn_is_answered(gw):
    history = [*WEATHER_MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "GetWeather", "arguments": '{"city": "Paris", "celsius": true}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C and sunny"}]
    tools = [openai.pydantic_function_tool(GetWeather)]
    r = gw.client().chat.completions.create(model="tiny", messages=history, tools=tools,
                                            tool_choice="none", max_completion_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.tool_calls is None


def test_tools_refused_where_they_cannot_be_honoured(gw):
    tools = [openai.pydantic_function_tool(GetWeather)]
    for model, param in (("fake", "tools"), ("triage", "tools")):
        with pytest.raises(openai.BadRequestError) as e:
            gw.client().chat.completions.create(model=model, messages=WEATHER_MSG, tools=tools)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        gw.client().chat.completions.create(model="tiny", messages=WEATHER_MSG,
                                            functions=[{"name": "f"}])
    assert e.value.body["param"] == "functions" and "'tools'" in e.value.body["message"]


def test_a_remote_upstream_gets_the_tools_and_its_calls_come_back(gw, oracle):
    tools = [openai.pydantic_function_tool(GetWeather)]
    r = gw.client().chat.completions.create(model="upstream", messages=WEATHER_MSG, tools=tools,
                                            tool_choice="required")
    assert oracle.bodies[-1]["tools"][0]["function"]["name"] == "GetWeather"
    assert oracle.bodies[-1]["tool_choice"] == "required"
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "GetWeather", {"city": "Rome"})


def test_a_mirrored_tool_call_is_scored_for_its_calls(gw):
    from shadow.report import summarize

    tools = [openai.pydantic_function_tool(GetWeather)]
    r = gw.client().chat.completions.create(model="shadowed", messages=WEATHER_MSG, tools=tools,
                                            tool_choice="required", seed=2,
                                            parallel_tool_calls=False,  # one call: no runaway
                                            max_completion_tokens=300)
    pair = stored_pair(gw, r.id)
    assert pair.request["tools"]["tools"][0]["function"]["name"] == "GetWeather"
    assert pair.scores["student_format_valid"] == pair.scores["teacher_format_valid"] == 1.0, (
        pair.teacher)
    assert pair.scores["tool_name_agreement"] == 1.0  # one function: both call it
    assert pair.scores["tool_args_agreement"] in (0.0, 1.0)
    route = next(x for x in summarize([pair], [])["routes"] if x["route"] == "shadowed")
    assert route["structured"]["tool_name_agreement"] == 1.0
