"""FakeEngine: deterministic text, budgets, stops, pacing, cancellation and logprobs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio

import pytest

from serving.engines import (
    GenerationRequest,
    Message,
    PromptTooLong,
    SamplingParams,
    build_engine,
    merge_deltas,
)
from serving.engines.config import FakeEngine as FakeConfig
from serving.engines.fake import WORDS, FakeEngine, render_chatml


def req(prompt="say something", rid="r1", messages=None, **params):
    params.setdefault("max_tokens", None)
    if messages is not None:
        return GenerationRequest(rid, SamplingParams(**params), messages=tuple(messages))
    return GenerationRequest(rid, SamplingParams(**params), prompt=prompt)


async def run(engine, request):
    return [d async for d in engine.generate(request)]


async def make(**kw):
    engine = build_engine(FakeConfig(**kw), resolve_path=lambda p: p)
    await engine.start()
    return engine


async def test_build_engine_gives_fake_with_info():
    engine = await make(context_window=100, max_concurrency=3)
    assert isinstance(engine, FakeEngine)
    assert engine.info.context_window == 100
    assert engine.info.max_concurrency == 3
    assert engine.info.supports_logprobs


async def test_same_request_same_text_and_one_word_per_token():
    engine = await make(completion_tokens=12)
    a = merge_deltas(await run(engine, req(temperature=0)))
    b = merge_deltas(await run(engine, req(temperature=0, rid="other")))
    assert a.text == b.text and a.token_ids == b.token_ids
    assert a.text.split() == [WORDS[i] for i in a.token_ids]
    assert a.completion_tokens == len(a.token_ids) == 12
    assert a.finish_reason == "stop"
    c = merge_deltas(await run(engine, req("a different prompt", temperature=0)))
    assert c.text != a.text


async def test_seed_controls_sampled_text():
    engine = await make(completion_tokens=20)
    s1 = merge_deltas(await run(engine, req(temperature=1, seed=1, rid="x")))
    s1b = merge_deltas(await run(engine, req(temperature=1, seed=1, rid="y")))
    s2 = merge_deltas(await run(engine, req(temperature=1, seed=2, rid="x")))
    assert s1.text == s1b.text
    assert s1.text != s2.text


async def test_no_seed_uses_request_id():
    engine = await make(completion_tokens=20)
    a = merge_deltas(await run(engine, req(temperature=0.7, rid="id-1")))
    a2 = merge_deltas(await run(engine, req(temperature=0.7, rid="id-1")))
    b = merge_deltas(await run(engine, req(temperature=0.7, rid="id-2")))
    assert a.text == a2.text and a.text != b.text


async def test_prompt_tokens_count_words_of_chatml_rendering():
    engine = await make(completion_tokens=3)
    messages = [Message("system", "be brief"), Message("user", "hello there friend")]
    rendered = render_chatml(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    out = merge_deltas(await run(engine, req(messages=messages)))
    assert out.prompt_tokens == len(rendered.split())
    plain = merge_deltas(await run(engine, req("one two three")))
    assert plain.prompt_tokens == 3


async def test_max_tokens_cuts_with_length():
    engine = await make(completion_tokens=10)
    deltas = await run(engine, req(max_tokens=4))
    out = merge_deltas(deltas)
    assert out.finish_reason == "length" and out.completion_tokens == 4 == len(out.token_ids)
    assert all(d.finish_reason is None for d in deltas[:-1])
    exact = merge_deltas(await run(engine, req(max_tokens=10)))
    assert exact.finish_reason == "stop" and exact.completion_tokens == 10


async def test_context_window_budget_and_prompt_too_long():
    engine = await make(completion_tokens=100, context_window=20)
    out = merge_deltas(await run(engine, req("w " * 15)))  # 15 prompt words: 5 left
    assert out.completion_tokens == 5 and out.finish_reason == "length"
    with pytest.raises(PromptTooLong):
        engine.generate(req("w " * 15, max_tokens=6))
    with pytest.raises(PromptTooLong):
        engine.generate(req("w " * 20))


async def test_zero_completion_tokens_gives_one_final_delta():
    engine = await make(completion_tokens=0)
    deltas = await run(engine, req())
    assert len(deltas) == 1
    assert deltas[0].text == "" and deltas[0].finish_reason == "stop"
    assert deltas[0].completion_tokens == 0


async def test_stop_string_cuts_text_before_it():
    engine = await make(completion_tokens=30)
    full = merge_deltas(await run(engine, req(temperature=0)))
    words = full.text.split()
    stop = " " + words[5]
    cut = full.text.index(stop)  # first occurrence may come before word 5
    out = merge_deltas(await run(engine, req(temperature=0, stop=(stop,))))
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert out.completion_tokens == len(out.token_ids) < 30
    assert full.text.startswith(out.text)


async def test_logprobs_are_sane_and_do_not_change_text():
    engine = await make(completion_tokens=8)
    plain = merge_deltas(await run(engine, req(temperature=0)))
    out = merge_deltas(await run(engine, req(temperature=0, logprobs=3)))
    assert out.text == plain.text
    assert out.logprobs is not None and len(out.logprobs) == 8
    assert "".join(lp.token for lp in out.logprobs) == out.text
    for lp in out.logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0] == (lp.token, lp.logprob)
    again = merge_deltas(await run(engine, req(temperature=0, logprobs=3)))
    assert again.logprobs == out.logprobs
    zero = merge_deltas(await run(engine, req(temperature=0, logprobs=0)))
    assert all(lp.top == () for lp in zero.logprobs)
    assert plain.logprobs is None


async def test_pacing_orders_first_token_after_ttft():
    engine = await make(completion_tokens=3, ttft_s=0.05, token_delay_s=0.01)
    events = []

    async def consume():
        async for d in engine.generate(req()):
            events.append(("token", d.text))

    async def marker():
        await asyncio.sleep(0)
        events.append(("tick", None))

    await asyncio.gather(consume(), marker())
    assert events[0] == ("tick", None)  # the first token waited for ttft
    assert [e for e, _ in events].count("token") == 3


async def test_closing_the_iterator_stops_generation():
    engine = await make(completion_tokens=1000, token_delay_s=0.001)
    stream = engine.generate(req())
    got = [await anext(stream) for _ in range(3)]
    await stream.aclose()
    assert len(got) == 3
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_task_cancellation_aborts_and_frees_the_slot():
    engine = await make(completion_tokens=1000, token_delay_s=0.01, max_concurrency=1)
    seen = []

    async def consume():
        async for d in engine.generate(req()):
            seen.append(d)

    task = asyncio.create_task(consume())
    while len(seen) < 2:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    count = len(seen)
    await asyncio.sleep(0.05)
    assert len(seen) == count
    # The one slot is free again: a new request completes.
    out = await asyncio.wait_for(run(engine, req(max_tokens=2)), timeout=5)
    assert merge_deltas(out).completion_tokens == 2


async def test_max_concurrency_queues_extra_requests():
    """Three requests sent together with max_concurrency=1: all are waiting before the first
    ends, and their tokens never interleave (at most one between its first and last delta)."""
    engine = await make(completion_tokens=3, ttft_s=0.02, token_delay_s=0.01, max_concurrency=1)
    order, events, inside, most = [], [], [0], [0]

    async def one(name):
        events.append("submit")
        first = True
        async for d in engine.generate(req(rid=name)):
            if first:
                inside[0] += 1
                most[0], first = max(most[0], inside[0]), False
            if d.finish_reason:
                inside[0] -= 1
                events.append("finish")
                order.append(name)

    await asyncio.gather(one("a"), one("b"), one("c"))
    assert sorted(order) == ["a", "b", "c"]
    assert events[:3] == ["submit"] * 3  # really concurrent: all sent before the first ended
    assert most[0] == 1
