"""The gateway through the official OpenAI client (sync and async), on real Ray Serve."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "Say something."}]


def test_models_list_and_retrieve(gateway):
    client = gateway.client()
    ids = {m.id for m in client.models.list()}
    assert ids == {"fake", "counted", "slow", "narrow", "hang", "paced", "greedy", "inline",
                   "inline-slow"}
    assert client.models.retrieve("fake").id == "fake"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["param"] == "model"


def test_an_omitted_temperature_takes_the_variants_default(gateway):
    client = gateway.client()
    card = client.models.retrieve("greedy").model_extra["sampling_defaults"]
    assert card == {"greedy": {"temperature": 0.0, "top_p": 1.0,
                               "source": {"temperature": "config", "top_p": "openai"}}}
    listed = {m.id: m.model_extra["sampling_defaults"] for m in client.models.list()}
    assert listed["fake"]["fake"]["temperature"] == 1.0 and listed["greedy"] == card

    def text(model, **kw):
        return client.chat.completions.create(model=model, messages=MSG, **kw) \
            .choices[0].message.content

    greedy = text("fake", temperature=0)  # the fake engine's greedy text depends on the prompt
    assert text("greedy", seed=1) == text("greedy", seed=2) == greedy  # default: temperature 0
    sampled = {text("greedy", temperature=1, seed=s) for s in range(3)}  # as sent: honoured
    assert len(sampled) > 1


def test_chat_non_stream_answer_and_usage(gateway):
    r = gateway.client().chat.completions.create(model="fake", messages=MSG, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "stop"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.model == "fake" and r.id.startswith("chatcmpl-")
    assert r.system_fingerprint == "fake:f1"


def test_max_tokens_cuts_with_length(gateway):
    client = gateway.client()
    for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = client.chat.completions.create(model="fake", messages=MSG, **kw)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5


def test_stream_equals_non_stream_at_temperature_zero(gateway):
    client = gateway.client()
    whole = client.chat.completions.create(model="fake", messages=MSG, temperature=0)
    chunks = list(client.chat.completions.create(model="fake", messages=MSG, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason]
    assert finishes == ["stop"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_stream_interval_sends_fewer_larger_chunks(gateway):
    client = gateway.client()
    whole = client.chat.completions.create(model="paced", messages=MSG, temperature=0)
    assert whole.usage.completion_tokens == 40
    chunks = list(client.chat.completions.create(model="paced", messages=MSG, temperature=0,
                                                 stream=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and
             c.choices[0].delta.content]
    assert "".join(texts) == whole.choices[0].message.content
    # 40 tokens 10 ms apart, sent at most every 100 ms (the first at once): about 5 chunks.
    assert 2 <= len(texts) <= 15, len(texts)


def test_stream_wire_format(gateway):
    body = {"model": "fake", "messages": MSG, "stream": True,
            "stream_options": {"include_usage": True}}
    with gateway.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("transfer-encoding") == "chunked"
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])


def test_n_choices_stream_and_not(gateway):
    client = gateway.client()
    r = client.chat.completions.create(model="fake", messages=MSG, n=3, seed=7, max_tokens=4)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="fake", messages=MSG, n=3, seed=7,
                                                 max_tokens=4, stream=True))
    finishes = {}
    texts = {0: "", 1: "", 2: ""}
    roles = set()
    for c in chunks:
        for ch in c.choices:
            if ch.delta.role:
                roles.add(ch.index)
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                assert ch.index not in finishes
                finishes[ch.index] = ch.finish_reason
    assert roles == {0, 1, 2} and finishes == {0: "length", 1: "length", 2: "length"}
    assert texts == {c.index: c.message.content for c in r.choices}


def test_n_choices_differ_when_sampled(gateway):
    """Without a seed, each of the n choices is sampled on its own."""
    r = gateway.client().chat.completions.create(model="fake", messages=MSG, n=3, temperature=1)
    texts = [c.message.content for c in r.choices]
    # Each of the 12 fake tokens is one of 59 words: two independently seeded choices are
    # equal with p = 59**-12 (~5e-22), so a repeat means the choices shared their seed.
    assert len(set(texts)) == 3, texts


def test_stop_sequence(gateway):
    client = gateway.client()
    whole = client.chat.completions.create(model="fake", messages=MSG, temperature=0)
    words = whole.choices[0].message.content.split()
    stop = " " + words[3]
    r = client.chat.completions.create(model="fake", messages=MSG, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].message.content
    assert whole.choices[0].message.content.startswith(r.choices[0].message.content)


def test_seed_reproducible(gateway):
    client = gateway.client()
    a = client.chat.completions.create(model="fake", messages=MSG, temperature=1, seed=42)
    b = client.chat.completions.create(model="fake", messages=MSG, temperature=1, seed=42)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_logprobs(gateway):
    r = gateway.client().chat.completions.create(
        model="fake", messages=MSG, logprobs=True, top_logprobs=3, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)


def test_text_parts_and_system_messages(gateway):
    r = gateway.client().chat.completions.create(model="fake", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                     {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again."},
    ], user="u-1")
    assert r.choices[0].message.content


def test_completions_endpoint(gateway):
    client = gateway.client()
    r = client.completions.create(model="fake", prompt="Once upon a time", max_tokens=6,
                                  temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="fake", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
        if c.choices)
    assert text == r.choices[0].text


def test_async_client_concurrent_streams(gateway):
    async def main():
        client = gateway.async_client()

        async def one(i):
            stream = await client.chat.completions.create(
                model="fake", messages=MSG, stream=True, seed=i)
            return "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])

        texts = await asyncio.gather(*(one(i) for i in range(8)))
        await client.close()
        return texts

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)


def test_unknown_fields_are_accepted(gateway):
    with gateway.http() as http:
        r = http.post("/v1/chat/completions", json={
            "model": "fake", "messages": MSG, "frobnicate": {"x": 1}, "store": False})
    assert r.status_code == 200, r.text
