"""serving.responses: response shapes against OpenAI's spec, SSE streams, error events, models."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest
import referencing
import referencing.jsonschema
import yaml

from core.errors import OpenAIError
from serving.engines.base import Delta, TokenLogprob, merge_deltas
from serving.responses import (
    DONE,
    ResponseMeta,
    chat_completion,
    completion,
    model_card,
    models_list,
    sse_error,
    sse_stream,
)

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "tests" / "data" / "openai" / "openai-chat-subset.yaml"
META = ResponseMeta("chatcmpl-abc123", 1_700_000_000, "student", "protege-v3")
CMETA = ResponseMeta("cmpl-abc123", 1_700_000_000, "student", None)


# -- the spec, as JSON Schema ------------------------------------------------------------------


def _nullable_to_jsonschema(node):
    """OpenAPI 3.0's `nullable: true` (still used in this 3.1 file) as JSON Schema."""
    if isinstance(node, list):
        return [_nullable_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_jsonschema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
        if isinstance(node.get("type"), str) and "$ref" not in node:
            node["type"] = [node["type"], "null"]
        else:
            return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="module")
def spec():
    if not SPEC.is_file():
        pytest.fail(f"OpenAI spec subset missing: {SPEC} (it ships in the repository)")
    doc = _nullable_to_jsonschema(yaml.safe_load(SPEC.read_text()))
    resource = referencing.Resource.from_contents(
        doc, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry = referencing.Registry().with_resource("urn:openai", resource)

    def validate(instance, name, patch=None):
        schema = copy.deepcopy(doc["components"]["schemas"][name])
        if patch:
            patch(schema)
        schema["$id"] = "urn:openai-local"
        local = registry.with_resource(
            "urn:openai-local",
            referencing.Resource.from_contents(
                {**doc, **schema}, default_specification=referencing.jsonschema.DRAFT202012
            ),
        )
        jsonschema.Draft202012Validator({"$ref": "urn:openai-local"}, registry=local).validate(
            instance
        )

    return validate


def _completion_chunk(schema):
    # Streamed legacy completions reuse CreateCompletionResponse, but OpenAI sends
    # "finish_reason": null until a choice's last chunk and, with include_usage, "usage": null
    # until the usage chunk (as ChatCompletionStreamOptions describes); the schema allows neither.
    fr = schema["properties"]["choices"]["items"]["properties"]["finish_reason"]
    fr["enum"] = [*fr["enum"], None]
    fr["type"] = ["string", "null"]
    schema["properties"]["usage"] = {"anyOf": [schema["properties"]["usage"], {"type": "null"}]}


# -- helpers ------------------------------------------------------------------------------------


def lp(token, logprob, *top):
    return TokenLogprob(token, logprob, tuple(top))


def answer(*pieces, finish="stop", prompt=5, with_logprobs=False) -> list[Delta]:
    """Deltas of one choice: one per piece, counts and finish_reason on the last."""
    out = []
    for k, p in enumerate(pieces):
        lps = (
            (lp(p, -0.5 * (k + 1), (p, -0.5 * (k + 1)), ("alt", -2.0)),) if with_logprobs else None
        )
        out.append(Delta(p, (100 + k,), lps))
    out[-1].finish_reason = finish
    out[-1].prompt_tokens = prompt
    out[-1].completion_tokens = len(pieces)
    return out


async def batches_of(groups):
    for g in groups:
        yield g


async def collect(stream) -> list[bytes]:
    return [b async for b in stream]


def events(raw: list[bytes]) -> list[str]:
    text = b"".join(raw).decode()
    assert text.endswith("\n\n")
    parts = text.split("\n\n")[:-1]
    assert all(p.startswith("data: ") and "\n" not in p for p in parts)
    return [p[len("data: ") :] for p in parts]


def chunks(raw: list[bytes]) -> list[dict]:
    evs = events(raw)
    assert evs[-1] == "[DONE]" and evs.count("[DONE]") == 1
    return [json.loads(e) for e in evs[:-1]]


def interleave(*choices: list[Delta]) -> list[list[tuple[int, Delta]]]:
    """One batch per step, each holding the next delta of every unfinished choice."""
    steps = max(map(len, choices))
    return [[(i, c[s]) for i, c in enumerate(choices) if s < len(c)] for s in range(steps)]


# -- non-streamed -------------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(spec):
    a = answer("Hel", "lo", "!", prompt=7)
    b = answer("Yo", finish="length", prompt=7)
    body = chat_completion(META, [merge_deltas(a), merge_deltas(b)])
    spec(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-abc123"
    assert body["system_fingerprint"] == "protege-v3" and body["model"] == "student"
    c0, c1 = body["choices"]
    assert c0 == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello!", "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert c1["index"] == 1 and c1["finish_reason"] == "length" and c1["message"]["content"] == "Yo"
    # The prompt is shared by the n choices: counted once.
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    json.dumps(body, allow_nan=False)


def test_chat_completion_without_fingerprint_or_counts(spec):
    meta = ResponseMeta("chatcmpl-x", 1, "m", None)
    body = chat_completion(meta, [Delta("hi", (1, 2, 3), finish_reason="stop")])
    spec(body, "CreateChatCompletionResponse")
    assert "system_fingerprint" not in body
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}


def test_chat_logprobs_format(spec):
    d = merge_deltas(
        [
            Delta("é", (1,), (lp("é", -0.1, ("é", -0.1), ("e", -2.5)),)),
            Delta("!", (2,), (lp("!", -math.inf, ("?", float("nan"))),), "stop", 3, 2),
        ]
    )
    body = chat_completion(META, [d])
    spec(body, "CreateChatCompletionResponse")
    content = body["choices"][0]["logprobs"]["content"]
    assert body["choices"][0]["logprobs"]["refusal"] is None
    assert content[0] == {
        "token": "é",
        "logprob": -0.1,
        "bytes": [195, 169],
        "top_logprobs": [
            {"token": "é", "logprob": -0.1, "bytes": [195, 169]},
            {"token": "e", "logprob": -2.5, "bytes": [101]},
        ],
    }
    assert content[1]["logprob"] == -9999.0 and content[1]["top_logprobs"][0]["logprob"] == -9999.0
    json.dumps(body, allow_nan=False)


def test_completion_shape_and_legacy_logprobs(spec):
    a = merge_deltas(answer("Once", " upon", prompt=2, with_logprobs=True))
    b = merge_deltas(answer(" a", finish="length", prompt=2))
    body = completion(CMETA, [a, b])
    spec(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion" and "system_fingerprint" not in body
    c0, c1 = body["choices"]
    assert c0["text"] == "Once upon" and c0["index"] == 0 and c0["finish_reason"] == "stop"
    assert c0["logprobs"] == {
        "tokens": ["Once", " upon"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"Once": -0.5, "alt": -2.0}, {" upon": -1.0, "alt": -2.0}],
        "text_offset": [0, 4],
    }
    assert c1 == {"text": " a", "index": 1, "logprobs": None, "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_models(spec):
    defaults = {"sampling_defaults": {"smollm2": {"temperature": 0.2, "top_p": 0.9}}}
    listing = models_list([("student", 1_700_000_000, defaults), ("teacher", 1_700_000_001, {})])
    spec(listing, "ListModelsResponse")
    assert listing["data"][0]["sampling_defaults"] == defaults["sampling_defaults"]
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [
        "student",
        "teacher",
    ]
    card = model_card("student", 5)
    spec(card, "Model")
    assert card == {"id": "student", "object": "model", "created": 5, "owned_by": "protege"}
    assert models_list([]) == {"object": "list", "data": []}


def test_error_bodies_match_spec(spec):
    for err in [
        OpenAIError.invalid_value("n", "bad"),
        OpenAIError.busy(),
        OpenAIError.bad_auth(),
        OpenAIError.unknown_model("x"),
        OpenAIError.body_too_large(10),
    ]:
        spec(err.body(), "ErrorResponse")
    raw = sse_error(OpenAIError.timeout())
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    spec(json.loads(raw[6:]), "ErrorResponse")


# -- streamed chat ------------------------------------------------------------------------------


async def test_chat_stream_single_choice(spec):
    deltas = answer("Hel", "lo", "!", prompt=4)
    raw = await collect(sse_stream("chat", META, batches_of([[(0, d)] for d in deltas]), 1, False))
    cs = chunks(raw)
    for c in cs:
        spec(c, "CreateChatCompletionStreamResponse")
        assert c["id"] == META.id and c["object"] == "chat.completion.chunk" and "usage" not in c
        assert c["created"] == META.created and c["system_fingerprint"] == "protege-v3"
    assert cs[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert [c["choices"][0]["delta"] for c in cs[1:]] == [
        {"content": "Hel"},
        {"content": "lo"},
        {"content": "!"},
    ]
    assert [c["choices"][0]["finish_reason"] for c in cs] == [None, None, None, "stop"]
    assert b"".join(raw).endswith(DONE)


async def test_chat_stream_n2_interleaved_matches_non_stream(spec):
    a = answer("The", " cat", " sat", ".", prompt=6, with_logprobs=True)
    b = answer("A", " dog", finish="length", prompt=6, with_logprobs=True)
    seen = []
    raw = await collect(
        sse_stream(
            "chat",
            META,
            batches_of(interleave(a, b)),
            2,
            True,
            on_delta=lambda i, d: seen.append((i, d.text)),
        )
    )
    assert len(raw) == 5  # one bytes per batch, then the usage chunk and [DONE]
    cs = chunks(raw)
    for c in cs:
        spec(c, "CreateChatCompletionStreamResponse")
        assert "usage" in c
    *body, last = cs
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 6,
        "total_tokens": 12,
    }
    assert all(c["usage"] is None for c in body)
    assert all(len(c["choices"]) == 1 for c in body)
    whole = chat_completion(META, [merge_deltas(a), merge_deltas(b)])
    assert last["usage"] == whole["usage"]
    for i in (0, 1):
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in m["delta"] for m in mine[1:])
        reasons = [m["finish_reason"] for m in mine]
        assert reasons[-1] is not None and reasons.count(None) == len(reasons) - 1
        assert reasons[-1] == whole["choices"][i]["finish_reason"]
        text = "".join(m["delta"].get("content", "") for m in mine)
        assert text == whole["choices"][i]["message"]["content"]
        streamed_lps = [t for m in mine if m["logprobs"] for t in m["logprobs"]["content"]]
        assert streamed_lps == whole["choices"][i]["logprobs"]["content"]
    # Interleaved: choice 1 speaks before choice 0 is done.
    order = [c["choices"][0]["index"] for c in body]
    assert order.index(1) < max(k for k, x in enumerate(order) if x == 0)
    assert seen == [(i, d.text) for batch in interleave(a, b) for i, d in batch]


async def test_chat_stream_skips_empty_deltas_and_closes_with_empty_delta():
    groups = [
        [(0, Delta(""))],
        [(0, Delta("a", (1,)))],
        [(0, Delta(""))],
        [(0, Delta("", (), None, "stop", 2, 1))],
    ]
    cs = chunks(await collect(sse_stream("chat", META, batches_of(groups), 1, False)))
    assert [c["choices"][0]["delta"] for c in cs] == [
        {"role": "assistant", "content": ""},
        {"content": "a"},
        {},
    ]
    assert cs[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_stream_merges_deltas_of_one_batch_and_ignores_after_finish():
    groups = [
        [(0, Delta("a", (1,))), (0, Delta("b", (2,))), (0, Delta("c", (3,), None, "length", 1, 3))],
        [(0, Delta("late"))],
    ]
    raw = await collect(sse_stream("chat", META, batches_of(groups), 1, True))
    cs = chunks(raw)
    assert [c["choices"] and c["choices"][0]["delta"] for c in cs[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "abc"},
    ]
    assert cs[1]["choices"][0]["finish_reason"] == "length"
    assert cs[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


async def test_stream_closes_unfinished_choices_once():
    groups = [[(0, Delta("x", (1,)))]]  # choice 0 never finishes, choice 1 never starts
    cs = chunks(await collect(sse_stream("chat", META, batches_of(groups), 2, True)))
    per = {0: [], 1: []}
    for c in cs[:-1]:
        per[c["choices"][0]["index"]].append(c["choices"][0])
    for i in (0, 1):
        assert per[i][0]["delta"]["role"] == "assistant"
        assert [m["finish_reason"] for m in per[i]].count("stop") == 1
    assert cs[-1]["usage"]["completion_tokens"] == 1


async def test_empty_stream_still_ends_properly(spec):
    cs = chunks(await collect(sse_stream("chat", META, batches_of([]), 1, False)))
    assert [c["choices"][0]["finish_reason"] for c in cs] == [None, "stop"]
    for c in cs:
        spec(c, "CreateChatCompletionStreamResponse")


# -- streamed completions -----------------------------------------------------------------------


async def test_completion_stream_matches_non_stream(spec):
    a = answer("Once", " upon", " a", prompt=3, with_logprobs=True)
    b = answer(" time", finish="length", prompt=3, with_logprobs=True)
    cs = chunks(
        await collect(sse_stream("completion", CMETA, batches_of(interleave(a, b)), 2, True))
    )
    for c in cs:
        spec(c, "CreateCompletionResponse", _completion_chunk)
        assert c["object"] == "text_completion" and "usage" in c
    *body, last = cs
    whole = completion(CMETA, [merge_deltas(a), merge_deltas(b)])
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    for i in (0, 1):
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == i]
        assert "".join(m["text"] for m in mine) == whole["choices"][i]["text"]
        assert [m["finish_reason"] for m in mine][-1] == whole["choices"][i]["finish_reason"]
        assert [m["finish_reason"] for m in mine].count(None) == len(mine) - 1
        offsets = [o for m in mine for o in m["logprobs"]["text_offset"]]
        assert offsets == whole["choices"][i]["logprobs"]["text_offset"]
        tokens = [t for m in mine for t in m["logprobs"]["tokens"]]
        assert tokens == whole["choices"][i]["logprobs"]["tokens"]


async def test_completion_stream_without_usage_has_no_usage_key():
    cs = chunks(
        await collect(
            sse_stream(
                "completion", CMETA, batches_of([[(0, d)] for d in answer("a", "b")]), 1, False
            )
        )
    )
    assert all("usage" not in c for c in cs)
    assert [c["choices"][0]["text"] for c in cs] == ["a", "b"]  # no role chunk for completions
    assert cs[-1]["choices"][0]["finish_reason"] == "stop"


# -- errors and cancellation ------------------------------------------------------------------


async def test_error_before_first_byte_propagates():
    async def failing():
        raise OpenAIError.context_length_exceeded("too long")
        yield  # pragma: no cover

    stream = sse_stream("chat", META, failing(), 1, False)
    with pytest.raises(OpenAIError) as e:
        await stream.__anext__()
    assert e.value.code == "context_length_exceeded"


async def test_error_after_first_byte_becomes_an_event():
    async def failing():
        yield [(0, Delta("partial", (1,)))]
        raise OpenAIError.timeout()

    evs = events(await collect(sse_stream("chat", META, failing(), 1, True)))
    assert "[DONE]" not in evs
    assert json.loads(evs[-1])["error"]["type"] == "timeout_error"
    assert json.loads(evs[1])["choices"][0]["delta"] == {"content": "partial"}


async def test_other_exceptions_propagate():
    async def broken():
        yield [(0, Delta("x"))]
        raise RuntimeError("engine crashed")

    with pytest.raises(RuntimeError):
        await collect(sse_stream("completion", CMETA, broken(), 1, False))


async def test_closing_the_stream_closes_the_batches():
    closed = []

    async def endless():
        try:
            while True:
                yield [(0, Delta("tok", (1,)))]
        finally:
            closed.append(True)

    stream = sse_stream("chat", META, endless(), 1, False)
    assert b"tok" in await stream.__anext__()
    await stream.aclose()
    assert closed == [True]


def test_non_ascii_and_surrogates_encode():
    body = chat_completion(META, [Delta("日本\ud800", (1,), finish_reason="stop")])
    from serving.responses import dumps

    raw = dumps(body)
    assert json.loads(raw)["choices"][0]["message"]["content"].startswith("日本")


def test_the_schema_check_is_not_vacuous(spec):
    body = chat_completion(META, [Delta("hi", finish_reason="stop")])
    for broken in (
        {**body, "object": "chat.completion.chunk"},
        {**body, "choices": [{**body["choices"][0], "finish_reason": "done"}]},
        {**body, "choices": [{k: v for k, v in body["choices"][0].items() if k != "logprobs"}]},
        {**body, "usage": {"prompt_tokens": 1}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            spec(broken, "CreateChatCompletionResponse")
