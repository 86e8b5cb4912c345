"""serving.protocol and core.errors: validation rules, null handling, fan-out, conversion."""

from __future__ import annotations

import json

import pytest

from core.errors import MAX_MESSAGE, OpenAIError
from serving.engines.base import Message
from serving.engines.tools import ToolCall
from serving.protocol import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
    unknown_fields,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": USER, **fields}).encode()


def comp(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": "once upon", **fields}).encode()


def bad(kind: str, body: bytes | str) -> OpenAIError:
    with pytest.raises(OpenAIError) as e:
        parse_request(kind, body)
    err = e.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.message and len(err.message) < 600
    return err


# -- happy paths ---------------------------------------------------------------------------------


def test_minimal_chat_defaults_and_conversion():
    r = parse_request("chat", chat())
    assert isinstance(r, ChatCompletionRequest)
    assert (r.model, r.n, r.stream, r.include_usage, r.wants_logprobs) == (
        "m",
        1,
        False,
        False,
        False,
    )
    [g] = r.to_generation_requests("req-1")
    assert g.request_id == "req-1" and g.prompt is None
    assert g.messages == (Message("user", "hi"),)
    p = g.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.logprobs) == (
        None,
        1.0,
        1.0,
        (),
        None,
        None,
    )


def test_chat_full_request_is_honoured():
    r = parse_request(
        "chat",
        chat(
            max_tokens=50,
            temperature=0.2,
            top_p=0.9,
            stop="\n",
            seed=7,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
            top_logprobs=3,
            user="u-1",
        ),
    )
    assert r.stream and r.include_usage and r.wants_logprobs and r.user == "u-1"
    gs = r.to_generation_requests("x")
    assert [g.params.seed for g in gs] == [7, 8]
    for g in gs:
        assert g.params.max_tokens == 50 and g.params.temperature == 0.2 and g.params.top_p == 0.9
        assert g.params.stop == ("\n",) and g.params.logprobs == 3


def test_roles_and_text_parts():
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "system",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "user", "content": [{"type": "text", "text": "q", "prompt_cache_breakpoint": {}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "t"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "name": "bot"},
        {"role": "user", "content": ""},
    ]
    r = parse_request("chat", json.dumps({"model": "m", "messages": messages}))
    assert r.messages[0].role == "developer"  # kept as sent; the engine sees system
    assert r.to_generation_requests("i")[0].messages == (
        Message("system", "be brief"),
        Message("system", "a\nb"),
        Message("user", "q"),
        Message("assistant", "", (ToolCall("t", "f", "{}"),)),
        Message("tool", "42", tool_call_id="t"),
        Message("assistant", "no"),
        Message("user", ""),
    )


def test_max_completion_tokens_wins():
    r = parse_request("chat", chat(max_tokens=10, max_completion_tokens=20))
    assert r.max_output_tokens == 20
    assert r.to_generation_requests("i")[0].params.max_tokens == 20
    assert parse_request("chat", chat(max_tokens=10)).max_output_tokens == 10


def test_logprobs_mapping():
    assert (
        parse_request("chat", chat(logprobs=True)).to_generation_requests("i")[0].params.logprobs
        == 0
    )
    assert parse_request("chat", chat(logprobs=True, top_logprobs=20)).logprobs_k == 20
    assert parse_request("chat", chat(logprobs=False)).logprobs_k is None
    c = parse_request("completion", comp(logprobs=0))
    assert c.wants_logprobs and c.to_generation_requests("i")[0].params.logprobs == 0
    c = parse_request("completion", comp(logprobs=5))
    assert c.to_generation_requests("i")[0].params.logprobs == 5
    assert not parse_request("completion", comp()).wants_logprobs


def test_completion_defaults_and_prompt_forms():
    r = parse_request("completion", comp())
    assert isinstance(r, CompletionRequest)
    [g] = r.to_generation_requests("c")
    assert g.prompt == "once upon" and g.messages is None
    assert g.params.max_tokens == 16  # OpenAI's default for completions
    assert parse_request("completion", comp(prompt=["one"])).prompt == "one"
    assert parse_request("completion", comp(prompt="")).prompt == ""
    r = parse_request("completion", comp(echo=False, best_of=2, n=2, suffix=None))
    assert len(r.to_generation_requests("c")) == 2


def test_a_number_without_fraction_is_an_integer():
    """JSON Schema's `integer`: `2.0` is 2 (a client may write any number as a float)."""
    r = parse_request("chat", chat(n=2.0, max_completion_tokens=5.0, seed=1e3, top_logprobs=1.0,
                                   logprobs=True))
    assert (r.n, r.max_completion_tokens, r.seed, r.top_logprobs) == (2, 5, 1000, 1)
    assert all(type(v) is int for v in (r.n, r.max_completion_tokens, r.seed, r.top_logprobs))
    c = parse_request("completion", comp(max_tokens=16.0, logprobs=0.0, best_of=2.0, n=2))
    assert (c.max_tokens, c.logprobs, c.best_of) == (16, 0, 2)
    assert type(c.max_tokens) is int
    assert parse_request("chat", chat(temperature=1)).temperature == 1.0  # numbers stay numbers
    assert bad("chat", chat(n=2.5)).param == "n"
    assert bad("chat", chat(seed=1e19)).param == "seed"  # integral, but beyond int64
    assert bad("completion", comp(max_tokens=1e300)).param == "max_tokens"
    assert bad("chat", chat(stream=1.0)).param == "stream"  # only integer fields


def test_empty_model_message_is_ours():
    err = bad("chat", chat(model=""))
    assert err.param == "model" and "at least 1 character" in err.message
    assert "String should" not in err.message  # no pydantic wording


def test_seed_fan_out_wraps_int64():
    r = parse_request("chat", chat(seed=INT64_MAX, n=3))
    assert [g.params.seed for g in r.to_generation_requests("i")] == [
        INT64_MAX,
        INT64_MIN,
        INT64_MIN + 1,
    ]
    r = parse_request("chat", chat(seed=INT64_MIN, n=2))
    assert [g.params.seed for g in r.to_generation_requests("i")] == [INT64_MIN, INT64_MIN + 1]
    r = parse_request("completion", comp(seed=-5, n=2))
    assert [g.params.seed for g in r.to_generation_requests("i")] == [-5, -4]
    r = parse_request("chat", chat(n=4))
    gs = r.to_generation_requests("i")
    assert len(gs) == 4 and all(g.params.seed is None for g in gs)
    assert all(g.messages is gs[0].messages for g in gs)


def test_top_p_zero_is_greedy():
    p = parse_request("chat", chat(top_p=0, temperature=0.7)).to_generation_requests("i")[0].params
    assert (p.temperature, p.top_p) == (0.0, 1.0)


def test_stop_forms():
    assert parse_request("chat", chat(stop="x")).stop == ("x",)
    assert parse_request("chat", chat(stop=["a", "b", "c", "d"])).stop == ("a", "b", "c", "d")
    assert parse_request("chat", chat(stop=[])).stop == ()
    assert parse_request("completion", comp(stop=["", "a", "a"])).stop == ("a",)


def test_nulls_are_absent():
    nulls = dict.fromkeys(
        [
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "stream",
            "stream_options",
            "logprobs",
            "top_logprobs",
            "user",
            "tools",
            "metadata",
            "frequency_penalty",
            "response_format",
            "store",
            "service_tier",
            "zzz",
        ]
    )
    r = parse_request("chat", chat(**nulls))
    assert (r.n, r.temperature, r.top_p, r.stream, r.stop, r.seed) == (1, 1.0, 1.0, False, (), None)
    assert r.unknown_fields() == () and r.ignored_fields() == ()
    c = parse_request(
        "completion",
        comp(
            **dict.fromkeys(
                ["max_tokens", "echo", "suffix", "logprobs", "best_of", "stream_options", "stream"]
            )
        ),
    )
    assert c.max_tokens == 16 and not c.echo and c.logprobs is None
    assert bad("chat", json.dumps({"model": None, "messages": USER})).param == "model"
    assert bad("chat", json.dumps({"model": "m", "messages": None})).param == "messages"
    assert bad("completion", json.dumps({"model": "m", "prompt": None})).param == "prompt"


def test_unknown_fields_are_ignored_and_reported():
    r = parse_request("chat", chat(zeta=1, alpha={"x": 1}, top_k=40))
    assert r.unknown_fields() == ("alpha", "top_k", "zeta") == unknown_fields(r)
    r = parse_request("chat", chat(**{f"k{i:02}": i for i in range(40)}, **{"y" * 500: 1}))
    assert len(r.unknown_fields()) == 16 and all(len(n) <= 64 for n in r.unknown_fields())
    assert parse_request("completion", comp(top_k=3)).unknown_fields() == ("top_k",)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice"),
    ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [TOOL], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": "f"}, "tools"),
    ({"tools": [TOOL], "tool_choice": 3}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_bad_function_calling_fields_are_refused_naming_them(fields, param):
    with pytest.raises(OpenAIError) as e:
        parse_request("chat", chat(**fields))
    assert e.value.status == 400 and e.value.param == param


def test_declared_tools_with_calls_forbidden_are_an_answer_in_text():
    for fields in ({"tools": [TOOL], "tool_choice": "none", "parallel_tool_calls": True},
                   {"functions": [{"name": "f"}], "function_call": "none"},
                   {"tools": [], "tool_choice": "none"}):
        r = parse_request("chat", chat(**fields))
        assert r.ignored_fields() == ()


def test_ignored_known_fields_are_reported_only_when_they_ask_for_something():
    r = parse_request(
        "chat",
        chat(
            frequency_penalty=0,
            presence_penalty=0.0,
            store=False,
            response_format={"type": "text"},
            logit_bias={},
            parallel_tool_calls=False,
            metadata={},
        ),
    )
    assert r.ignored_fields() == () and r.unknown_fields() == ()
    r = parse_request(
        "chat",
        chat(
            frequency_penalty=0.5,
            response_format={"type": "json_object"},
            service_tier="auto",
            logit_bias={"50256": -100},
        ),
    )
    assert r.response_format is not None  # honoured: serving.engines.structured, test_structured.py
    assert set(r.ignored_fields()) == {
        "frequency_penalty",
        "service_tier",
        "logit_bias",
    }
    assert r.unknown_fields() == ()
    c = parse_request("completion", comp(suffix="end", presence_penalty=1))
    assert set(c.ignored_fields()) == {"suffix", "presence_penalty"}


# -- rejections ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -1}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": "2"}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop[1]"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {}}, "stream_options"),
        ({"stream": True, "stream_options": "usage"}, "stream_options"),
        (
            {"stream": True, "stream_options": {"include_usage": "y"}},
            "stream_options.include_usage",
        ),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"user": 5}, "user"),
        ({"model": ""}, "model"),
        ({"model": 3}, "model"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"store": "no"}, "store"),
    ],
)
def test_chat_bad_values(fields, param):
    err = bad("chat", chat(**fields))
    assert err.param == param
    assert param.split(".")[0].split("[")[0] in err.message


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hi", "messages"),
        ({"role": "user"}, "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "function", "content": "x", "name": "f"}], "messages[0].role"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
        ([{"role": "assistant", "content": "x", "tool_calls": [{"id": "a"}]}],
         "messages[0].tool_calls[0]"),
        ([{"role": "assistant", "content": "x", "tool_calls": [{"id": "a", "function": [1]}]}],
         "messages[0].tool_calls[0]"),
        ([{"role": "function", "content": "x", "name": "f"}], "messages[0].role"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "system", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": []}], "messages[0].content"),
        (USER + [{"role": "user", "content": ["x"]}], "messages[1].content[0]"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                }
            ],
            "messages[0].content[1].type",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "messages[0].content[0].type",
        ),
        (
            [{"role": "user", "content": [{"type": "file", "file": {}}]}],
            "messages[0].content[0].type",
        ),
        ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0].type"),
        (
            [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}],
            "messages[0].content[0].type",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            "messages[0].content[0].text",
        ),
        ([{"role": "user", "content": "x", "name": 3}], "messages[0].name"),
    ],
)
def test_chat_bad_messages(messages, param):
    err = bad("chat", json.dumps({"model": "m", "messages": messages}))
    assert err.param == param


def test_image_part_message_names_the_type():
    body = json.dumps(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "u"}},
                    ],
                }
            ],
        }
    )
    err = bad("chat", body)
    assert "image_url" in err.message and "text" in err.message


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"best_of": 21, "n": 21}, "best_of"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["1", "2", "3", "4", "5"]}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"temperature": 2.1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 200}, "n"),
        ({"suffix": 1}, "suffix"),
    ],
)
def test_completion_bad_values(fields, param):
    assert bad("completion", comp(**fields)).param == param


def test_several_prompts_say_one_is_supported():
    err = bad("completion", comp(prompt=["a", "b"]))
    assert "one string prompt" in err.message


def test_missing_required():
    assert bad("chat", json.dumps({"messages": USER})).param == "model"
    assert bad("chat", json.dumps({"model": "m"})).param == "messages"
    err = bad("completion", json.dumps({"model": "m"}))
    assert err.param == "prompt" and err.code == "missing_required_parameter"


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"{'model': 'm'}", b"\xff\xfe", b'{"model": "m",}', "nope"],
)
def test_invalid_json(body):
    err = bad("chat", body)
    assert err.param is None and "JSON" in err.message and err.code == "invalid_json"


@pytest.mark.parametrize(
    "body, got",
    [(b"[]", "an array"), (b'"s"', "a string"), (b"3", "an integer"), (b"null", "null")],
)
def test_body_must_be_an_object(body, got):
    err = bad("completion", body)
    assert err.param is None and "JSON object" in err.message and got in err.message


def test_nan_and_infinity_are_rejected():
    assert (
        bad(
            "chat", b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":NaN}'
        ).param
        == "temperature"
    )
    assert (
        bad(
            "chat", b'{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":Infinity}'
        ).param
        == "top_p"
    )


def test_messages_say_value_and_allowed_range():
    err = bad("chat", chat(temperature=3))
    assert "3" in err.message and "2" in err.message
    err = bad("chat", chat(n="2"))
    assert "integer" in err.message and "string" in err.message
    err = bad("chat", chat(seed=2**64))
    assert str(2**64) in err.message and str(INT64_MAX) in err.message


def test_first_error_is_reported():
    err = bad("chat", json.dumps({"messages": [], "temperature": 9}))
    assert err.param == "messages"


def test_huge_values_stay_bounded_in_the_message():
    err = bad("chat", chat(temperature="x" * 100_000))
    assert len(err.message) < 300
    err = bad(
        "chat", json.dumps({"model": "m", "messages": [{"role": "y" * 100_000, "content": ""}]})
    )
    assert len(err.message) < 400


VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    3,
    2**70,
    1.5,
    -0.5,
    "",
    "x",
    [],
    [1],
    ["a"],
    [[1]],
    {},
    {"a": 1},
    {"type": "text"},
]
FIELDS = {
    "chat": [
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "user",
        "frequency_penalty",
        "logit_bias",
        "tools",
        "metadata",
        "store",
        "parallel_tool_calls",
    ],
    "completion": [
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "logprobs",
        "echo",
        "best_of",
        "suffix",
        "user",
    ],
}
CROSS = {"stream_options", "top_logprobs", "best_of", "echo"}


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_no_pydantic_error_escapes(kind):
    make = chat if kind == "chat" else comp
    for field in FIELDS[kind]:
        for value in VALUES:
            try:
                r = parse_request(kind, make(**{field: value}))
            except OpenAIError as e:
                assert e.status == 400
                assert e.param and (
                    e.param.split(".")[0].split("[")[0] == field or e.param in CROSS
                )
            else:
                assert r.to_generation_requests("i")


# -- errors ----------------------------------------------------------------------------------------


def test_error_body_shape_and_bound():
    err = OpenAIError(400, "x" * 5000, param="p" * 500)
    body = err.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert len(body["error"]["message"]) == MAX_MESSAGE and body["error"]["message"].endswith("…")
    assert len(body["error"]["param"]) <= 200
    assert OpenAIError(400, "short").body()["error"] == {
        "message": "short",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_error_constructors():
    cases = {
        OpenAIError.invalid_value("temperature", "bad"): (
            400,
            "invalid_request_error",
            "temperature",
        ),
        OpenAIError.invalid_json(): (400, "invalid_request_error", None),
        OpenAIError.context_length_exceeded("too long", "prompt"): (
            400,
            "invalid_request_error",
            "prompt",
        ),
        OpenAIError.bad_auth(): (401, "authentication_error", None),
        OpenAIError.unknown_model("nope"): (404, "not_found_error", "model"),
        OpenAIError.not_found("/v2/x"): (404, "not_found_error", None),
        OpenAIError.timeout(): (408, "timeout_error", None),
        OpenAIError.body_too_large(1024): (413, "invalid_request_error", None),
        OpenAIError.unsupported_media_type("text/plain"): (415, "invalid_request_error", None),
        OpenAIError.rate_limited(3): (429, "rate_limit_error", None),
        OpenAIError.server_error(): (500, "server_error", None),
        OpenAIError.busy(2): (503, "server_error", None),
    }
    for err, (status, type_, param) in cases.items():
        assert (err.status, err.type, err.param) == (status, type_, param), err
        assert isinstance(err, Exception) and str(err) == err.message
    assert OpenAIError.body_too_large(10).code == "body_too_large"
    assert OpenAIError.busy(2).code == "server_busy"
    assert OpenAIError.busy(2).headers == {"Retry-After": "2"}
    assert OpenAIError.busy(0).headers == {"Retry-After": "1"}
    assert OpenAIError.rate_limited().headers == {"Retry-After": "1"}
    assert OpenAIError.context_length_exceeded("m").code == "context_length_exceeded"
    assert OpenAIError.bad_auth().headers == {}


def test_aliases_and_retry_after_rounding():
    assert OpenAIError.unauthorized().status == 401
    assert OpenAIError.not_found_model("x").param == "model"
    err = OpenAIError.invalid("too long", param="prompt", code="context_length_exceeded")
    assert (err.status, err.param, err.code, err.message) == (
        400,
        "prompt",
        "context_length_exceeded",
        "too long",
    )
    assert OpenAIError.busy(0.2).headers == {"Retry-After": "1"}
    assert OpenAIError.busy(2.5).headers == {"Retry-After": "3"}
    assert "30 s" in OpenAIError.timeout(30.0).message and OpenAIError.timeout().status == 408


def test_unknown_model_names_only_what_was_sent():
    err = OpenAIError.unknown_model("gpt-9" + "z" * 5000)
    assert "gpt-9" in err.message and len(err.message) < 300
