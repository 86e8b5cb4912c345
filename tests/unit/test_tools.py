"""serving.engines.tools: function calling checked, written into the prompt, constrained on real
engines (llama.cpp and transformers on tiny random models built in code), read back from answers whole
and streamed (rebuilt by the OpenAI SDK's own stream accumulator), and scored by the shadow."""

from __future__ import annotations

import json

import pytest
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from serving.engines import build_engine
from serving.engines.base import Delta, GenerationRequest, Message, SamplingParams, merge_deltas
from serving.engines.config import LlamaCppEngine as LlamaCppConfig
from serving.engines.config import TransformersEngine as TransformersConfig
from serving.engines.structured import FormatError, check_answer
from serving.engines.tools import (
    GENERIC_PROMPT,
    CallStream,
    ToolCall,
    parse_tools,
    prompt_messages,
    read_calls,
    renders_tools,
)
from serving.protocol import parse_request
from serving.responses import ResponseMeta, chat_completion, sse_stream
from shadow.export import messages_of
from shadow.records import Answer, PairRecord
from shadow.scoring import score_pair, tool_scores
from tests.unit.test_engine_llamacpp import write_tiny_gguf
from tests.unit.test_gguf import bpe_tokenizer, save, tiny_model
from tests.unit.test_responses import batches_of, chunks, collect, spec  # noqa: F401

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}, "celsius": {"type": "boolean"}},
        "required": ["city", "celsius"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}
NAMES = ("get_weather", "get_time")
META = ResponseMeta("chatcmpl-tools", 1_700_000_000, "student", "v1")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "celsius": true}}\n' \
       "</tool_call>"
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'


def use(choice=None, parallel=None, tools=(WEATHER, TIME)):
    return parse_tools(list(tools), choice, parallel)


# -- the request ----------------------------------------------------------------------------------


def test_tool_choice_defaults_and_modes():
    assert use().choice == "auto" and use().parallel
    assert use("none") is None and parse_tools(None, None) is None
    assert use("required", False).format().parallel is False
    named = use({"type": "function", "function": {"name": "get_time"}})
    assert named.choice == "get_time"
    assert not named.format().parallel  # a named function is one call
    assert named.openai()["tool_choice"] == {"type": "function",
                                             "function": {"name": "get_time"}}
    assert use().openai()["tools"] == [WEATHER, TIME]  # as sent, key order kept


@pytest.mark.parametrize("tools, choice, param, words", [
    ([{"type": "retrieval"}], None, "tools[0].type", "Only 'function'"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "tools[0].function.name", "64"),
    ([WEATHER, WEATHER], None, "tools[1].function.name", "declared twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array", "uniqueItems": True}}}], None, "tools[0].function.parameters",
     "'uniqueItems' cannot be enforced"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice",
     "not one of the declared"),
    ([WEATHER], "sometimes", "tool_choice", "'required'"),
    ([WEATHER], {"type": "function", "function": "get_weather"}, "tool_choice", "'required'"),
    ([WEATHER], {"type": "function"}, "tool_choice", "'required'"),
    ("get_weather", None, "tools", "expected an array"),
    (None, "required", "tool_choice", "only allowed when 'tools'"),
])
def test_refusals_name_the_field(tools, choice, param, words):
    with pytest.raises(FormatError) as e:
        parse_tools(tools, choice)
    assert e.value.param == param and words in e.value.message


def test_the_request_carries_tools_and_the_call_format_to_the_engine():
    r = parse_request("chat", json.dumps({
        "model": "m", "tools": [WEATHER], "tool_choice": "required", "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}))
    g = r.to_generation_requests("i")[0]
    assert g.tools == r.tool_use and g.params.response_format.type == "tool_calls"
    assert g.messages[1].tool_calls == (ToolCall("c1", "get_weather", '{"city": "Rome"}'),)
    assert g.messages[2] == Message("tool", "sunny", tool_call_id="c1")


def test_the_call_format_accepts_exactly_valid_calls():
    required, auto = use("required").format(), use().format()
    assert check_answer(required, CALL) is None
    assert check_answer(required, CALL + "\n" + CALL2) is None
    assert check_answer(use("required", False).format(), CALL + "\n" + CALL2) is not None
    assert check_answer(required, "It is sunny.") == "no tool call"
    assert check_answer(required, CALL.replace("Paris", "Lyon")) is not None  # not in the enum
    assert check_answer(required, CALL.replace("get_weather", "get_wether")) is not None
    assert check_answer(auto, "It is sunny.") is None
    assert check_answer(auto, "Let me look.\n" + CALL) is None
    assert check_answer(auto, "<tool_call>\n{\"name\": ") == "an unfinished tool call"
    bare = '{"name": "get_time", "arguments": {"city": "Oslo"}}'  # a small model drops the tags
    assert check_answer(auto, bare) is None
    assert check_answer(auto, bare.replace("Oslo", "Bergen")) is not None
    assert check_answer(auto, '{"answer": 42}') is not None  # `{` begins a call in auto mode


# -- the prompt -----------------------------------------------------------------------------------

HISTORY = (
    Message("system", "Be brief."),
    Message("user", "Weather in Paris and time in Oslo?"),
    Message("assistant", "", (ToolCall("c1", "get_weather", '{"city": "Paris", "celsius": true}'),
                              ToolCall("c2", "get_time", '{"city": "Oslo"}'))),
    Message("tool", "21 C", tool_call_id="c1"),
    Message("tool", "10:00", tool_call_id="c2"),
)


def test_a_template_without_tools_gets_the_generic_prompt_and_plain_turns():
    messages, tools = prompt_messages(HISTORY, use(), native=False)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2]["content"] == call_text_of(HISTORY[2])
    assert messages[3]["content"] == ("<tool_response>\n21 C\n</tool_response>\n"
                                      "<tool_response>\n10:00\n</tool_response>")
    alone, _ = prompt_messages(HISTORY[1:2], use(), native=False)
    assert alone[0] == {"role": "system", "content": GENERIC_PROMPT.format(
        tools="\n".join(json.dumps(t) for t in (WEATHER, TIME)))}
    assert prompt_messages(HISTORY[1:2], None, native=False)[0] == [
        {"role": "user", "content": HISTORY[1].content}]


def call_text_of(message):
    return "\n".join(
        f'<tool_call>\n{{"name": "{c.name}", "arguments": {c.arguments}}}\n</tool_call>'
        for c in message.tool_calls)


# A chat template that renders tools in the Hermes form, as Qwen's does (written for this test).
HERMES = (
    "{% if tools %}<|system|>{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Answer with <tool_call></tool_call>.\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}\n{% endfor %}<|assistant|>"
)


def test_a_template_that_renders_tools_gets_them_as_it_expects():
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert renders_tools(HERMES) and not renders_tools("{{ messages }}")
    messages, tools = prompt_messages(HISTORY, use(), native=True)
    assert tools == [WEATHER, TIME]
    assert messages[2]["tool_calls"][1]["function"]["arguments"] == {"city": "Oslo"}  # an object
    assert messages[3] == {"role": "tool", "content": "21 C", "tool_call_id": "c1"}
    prompt = Jinja2ChatFormatter(HERMES, "", "")(messages=messages, tools=tools).prompt
    assert '"name": "get_time"' in prompt
    assert '<tool_call>get_time {"city": "Oslo"}</tool_call>' in prompt
    assert "<|tool|>10:00" in prompt


# -- the answer -----------------------------------------------------------------------------------


def test_read_calls_gives_ids_content_and_arguments_as_text():
    content, calls = read_calls("Checking.\n" + CALL + "\n" + CALL2, NAMES, "r", 0)
    assert content == "Checking."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "celsius": True}
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    assert read_calls(CALL, NAMES, "r", 0)[1][0].id == calls[0].id  # stable
    assert read_calls(CALL, NAMES, "r", 1)[1][0].id != calls[0].id
    assert read_calls(CALL, NAMES, "r", 0)[0] is None
    wrong = CALL.replace("get_weather", "launch")
    assert read_calls(wrong, NAMES, "r", 0) == (wrong, [])  # not a declared tool: all content
    assert read_calls("plain", NAMES, "r", 0) == ("plain", [])
    content, (bare,) = read_calls(' {"name": "get_time", "arguments": {"city": "Oslo"}}',
                                  NAMES, "r", 0)
    assert content is None and (bare.name, bare.arguments) == ("get_time", '{"city": "Oslo"}')
    assert read_calls('{"city": "Oslo"}', NAMES, "r", 0) == ('{"city": "Oslo"}', [])


@pytest.mark.parametrize("text", [
    CALL + "\n" + CALL2, "Checking.\n" + CALL, "No call here, only <b>text</b>.",
    CALL + "\n<tool_call>\n{\"name\": \"get_t", "<tool_ca",
    '  {"name": "get_time", "arguments": {"city": "Oslo"}}', '{"not": "a call"}'])
def test_a_streamed_answer_splits_like_the_whole(text):
    for size in (1, 3, 17):
        stream = CallStream(NAMES, "r", 0)
        items = []
        for k in range(0, len(text), size):
            items += stream.push(text[k:k + size])
        items += stream.flush()
        calls = [x for x in items if isinstance(x, ToolCall)]
        content = "".join(x for x in items if isinstance(x, str))
        whole_content, whole_calls = read_calls(text, NAMES, "r", 0)
        if whole_calls:
            assert calls == whole_calls
            assert content.strip() == (whole_content or "")
        else:
            assert content == text


def test_a_whole_answer_with_calls(spec):  # noqa: F811
    body = chat_completion(META, [Delta(CALL + "\n" + CALL2, finish_reason="stop")], NAMES)
    spec(body, "CreateChatCompletionResponse")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == list(NAMES)
    cut = chat_completion(META, [Delta(CALL[:30], finish_reason="length")], NAMES)
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["choices"][0]["message"]["content"] == CALL[:30]
    plain = chat_completion(META, [Delta("Hi", finish_reason="stop")], NAMES)
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in plain["choices"][0]["message"]


async def test_the_sdk_stream_accumulator_rebuilds_the_whole_answer(spec):  # noqa: F811
    text = "Let me check.\n" + CALL + "\n" + CALL2
    pieces = [Delta(text[k:k + 5]) for k in range(0, len(text), 5)]
    pieces[-1].finish_reason = "stop"
    raw = await collect(sse_stream("chat", META, batches_of([[(0, d)] for d in pieces]), 1,
                                   False, tool_names=NAMES))
    state = ChatCompletionStreamState()
    for chunk in chunks(raw):
        spec(chunk, "CreateChatCompletionStreamResponse")
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    streamed = state.get_final_completion().choices[0]
    whole = chat_completion(META, [merge_deltas(pieces)], NAMES)["choices"][0]
    assert streamed.finish_reason == whole["finish_reason"] == "tool_calls"
    assert [c.model_dump(exclude_none=True, exclude={"index"})
            for c in streamed.message.tool_calls] == \
        whole["message"]["tool_calls"]
    assert streamed.message.content.strip() == whole["message"]["content"]


# -- engines --------------------------------------------------------------------------------------


async def calls_of(engine, tool_use, seeds, max_tokens=300):
    out = []
    for seed in seeds:
        params = SamplingParams(max_tokens, temperature=1.0, seed=seed,
                                response_format=tool_use.format())
        request = GenerationRequest("r", params, messages=HISTORY[:2], tools=tool_use)
        whole = merge_deltas([d async for d in engine.generate(request)])
        out.append(whole)
    return out


async def assert_calls_enforced(engine):
    """A random model, constrained, calls only declared tools with valid arguments."""
    for tool_use in (use("required", False), use({"type": "function",
                                                  "function": {"name": "get_time"}})):
        for whole in await calls_of(engine, tool_use, range(4)):
            assert whole.finish_reason == "stop", whole.text
            assert check_answer(tool_use.format(), whole.text) is None, whole.text
            content, calls = read_calls(whole.text, NAMES, "r", 0)
            assert content is None and len(calls) == 1
            assert tool_use.choice == "required" or calls[0].name == "get_time"
    auto = use()
    for whole in await calls_of(engine, auto, range(3), max_tokens=40):
        assert whole.finish_reason == "length" or check_answer(auto.format(), whole.text) is None


async def test_llamacpp_constrains_calls(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    engine = build_engine(LlamaCppConfig(path=str(path), n_ctx=2048, n_threads=1),
                          resolve_path=lambda p: p)
    await engine.start()
    try:
        await assert_calls_enforced(engine)
    finally:
        await engine.close()


async def test_transformers_constrains_calls(tmp_path):
    tokenizer = bpe_tokenizer()
    model = tiny_model("llama", tokenizer, max_position_embeddings=2048)  # the tool prompt
    folder = save(tmp_path / "tiny", model, tokenizer)
    engine = build_engine(TransformersConfig(model=str(folder)), resolve_path=lambda p: p)
    await engine.start()
    try:
        await assert_calls_enforced(engine)
    finally:
        await engine.close()


# -- the shadow -----------------------------------------------------------------------------------


def test_tool_scores():
    assert tool_scores("hi", "hello") == {"tool_name_agreement": None,
                                          "tool_args_agreement": None}
    assert tool_scores(CALL, CALL) == {"tool_name_agreement": 1.0, "tool_args_agreement": 1.0}
    both = CALL + "\n" + CALL2
    assert tool_scores(CALL2 + "\n" + CALL, both)["tool_args_agreement"] == 1.0  # any order
    rome = CALL.replace("Paris", "Rome")
    assert tool_scores(rome, CALL) == {"tool_name_agreement": 1.0, "tool_args_agreement": 0.0}
    assert tool_scores(CALL, both) == {"tool_name_agreement": 0.5, "tool_args_agreement": 0.5}
    assert tool_scores("It is sunny.", CALL)["tool_name_agreement"] == 0.0
    assert score_pair(rome, CALL)["disagreement"] > score_pair(CALL, CALL)["disagreement"]


def test_an_exported_pair_shows_the_student_its_tools():
    from shadow.mirror import request_dict

    tool_use = use("required")
    request = GenerationRequest("r", SamplingParams(50, response_format=tool_use.format()),
                                messages=HISTORY, tools=tool_use)
    stored = json.loads(json.dumps(request_dict(request)))
    assert stored["tools"]["tool_choice"] == "required"
    assert stored["messages"][2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert stored["params"]["response_format"]["type"] == "tool_calls"
    answer = Answer(model="m", version="v", text=CALL, finish_reason="stop", prompt_tokens=1,
                    completion_tokens=1, ttft_ms=1.0, latency_ms=1.0)
    pair = PairRecord(pair_id="p", request_id="p", route="r", variant="s", target="t",
                      request=stored, student=answer, teacher=answer, created_at="2026-01-01",
                      teacher_logprobs=None, scores={})
    assert messages_of(pair) == prompt_messages(HISTORY, tool_use, native=False)[0]
