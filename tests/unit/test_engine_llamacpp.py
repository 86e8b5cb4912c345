"""LlamaCppEngine on a tiny random llama GGUF written in code with `gguf` (no model files).

The GGUF has 2 layers, 64 wide, a sentencepiece vocab of letters and byte tokens, ChatML
control tokens and a ChatML chat template in its metadata.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import string
import threading

import gguf
import numpy as np
import pytest
import pytest_asyncio

from serving.engines import (
    EngineError,
    GenerationRequest,
    Message,
    PromptTooLong,
    SamplingParams,
    build_engine,
    merge_deltas,
)
from serving.engines.config import LlamaCppEngine as LlamaCppConfig
from serving.engines.llamacpp import LlamaCppEngine

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_CTX = 256


def write_tiny_gguf(path, *, eos_first=False, chat_template=CHATML, seed=0):
    """A random 2-layer llama. `eos_first`: the weights make <|im_end|> the greedy first token."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 4
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581", *string.ascii_letters, *string.digits, *".,!?"]
    pieces += ["\u2581" + c for c in string.ascii_lowercase]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 261 + [-float(i) for i in range(len(pieces))]
    n_vocab, n_embd, n_ff, n_head, n_layer = len(tokens), 64, 128, 4, 2
    eos = tokens.index("<|im_end|>")

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    if chat_template:
        w.add_chat_template(chat_template)

    rng = np.random.default_rng(seed)

    def rand(*shape, std=0.05):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    embd = rand(n_vocab, n_embd, std=1.0)
    attn_out = [rand(n_embd, n_embd) for _ in range(n_layer)]
    ffn_down = [rand(n_embd, n_ff) for _ in range(n_layer)]
    out = rand(n_vocab, n_embd, std=1.0)
    out[5:261] *= 0.1  # byte tokens rarely win: mostly readable letters
    out[:5] = 0  # unk and control tokens (eos too) have logit 0: never the greedy pick
    if eos_first:  # dimension 0 is a constant positive residual that only eos reads
        embd[:, 0] = 5.0
        for m in (*attn_out, *ffn_down):
            m[0] = 0
        out[:, 0] = 0
        out[eos, 0] = 100.0

    w.add_tensor("token_embd.weight", embd)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        for name in ("q", "k", "v"):
            w.add_tensor(f"blk.{i}.attn_{name}.weight", rand(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", attn_out[i])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", ffn_down[i])
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


async def started(path, **kw):
    engine = build_engine(LlamaCppConfig(path=str(path), n_ctx=N_CTX, n_threads=1, **kw),
                          resolve_path=lambda p: p)
    assert isinstance(engine, LlamaCppEngine)
    await engine.start()
    return engine


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    eng = await started(path)
    yield eng
    await eng.close()


pytestmark = pytest.mark.asyncio(loop_scope="module")

MESSAGES = (Message("system", "be brief"), Message("user", "hello world"))


def chat(max_tokens=12, rid="r", **params):
    return GenerationRequest(rid, SamplingParams(max_tokens, **params), messages=MESSAGES)


async def run(engine, request):
    return [d async for d in engine.generate(request)]


async def test_info(engine):
    assert engine.info.model == "tiny.gguf"
    assert engine.info.context_window == N_CTX
    assert engine.info.supports_logprobs and engine.info.max_concurrency == 4  # n_parallel


async def test_chat_prompt_uses_the_gguf_template(engine):
    ids = engine.tokenize_request(chat())
    text = engine.detokenize(ids, special=True).decode()
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids[0] == 3 and ids.count(3) == 3  # <|im_start|> is one control token


async def test_greedy_is_deterministic_with_counts(engine):
    deltas = await run(engine, chat(12, temperature=0))
    out = merge_deltas(deltas)
    assert out.finish_reason == "length"
    assert out.completion_tokens == len(out.token_ids) == 12
    assert out.prompt_tokens == len(engine.tokenize_request(chat()))
    assert all(d.finish_reason is None for d in deltas[:-1])
    full = engine.detokenize(list(out.token_ids)).decode("utf-8", errors="replace")
    assert out.text == full  # streamed pieces add up to the whole decode
    again = merge_deltas(await run(engine, chat(12, temperature=0, rid="x")))
    assert (again.token_ids, again.text) == (out.token_ids, out.text)


async def test_completion_prompt(engine):
    req = GenerationRequest("c", SamplingParams(4, temperature=0), prompt="abc def")
    out = merge_deltas(await run(engine, req))
    assert out.prompt_tokens == len(engine.model.tokenize(b"abc def", True, True))
    assert out.completion_tokens == 4


async def test_stop_string_cuts_text(engine):
    full = merge_deltas(await run(engine, chat(40, temperature=0))).text
    stop = next(c for c in full[5:] if c in string.ascii_letters)
    out = merge_deltas(await run(engine, chat(40, temperature=0, stop=(stop,))))
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop"
    assert out.completion_tokens == len(out.token_ids) < 40


async def test_logprobs_are_sane(engine):
    plain = merge_deltas(await run(engine, chat(6, temperature=0)))
    out = merge_deltas(await run(engine, chat(6, temperature=0, logprobs=4)))
    assert out.token_ids == plain.token_ids and len(out.logprobs) == 6
    for lp in out.logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 4
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0] == (lp.token, pytest.approx(lp.logprob))  # greedy picks the best
        assert sum(np.exp(values)) <= 1 + 1e-6
    zero = merge_deltas(await run(engine, chat(2, temperature=0, logprobs=0)))
    assert all(lp.top == () for lp in zero.logprobs)
    assert plain.logprobs is None


async def test_seed_reproducible_at_temperature_one(engine):
    a = merge_deltas(await run(engine, chat(16, temperature=1.0, seed=11)))
    b = merge_deltas(await run(engine, chat(16, temperature=1.0, seed=11)))
    c = merge_deltas(await run(engine, chat(16, temperature=1.0, seed=12)))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


async def test_prompt_too_long(engine):
    with pytest.raises(PromptTooLong):
        engine.generate(GenerationRequest("l", SamplingParams(None), prompt="a" * (N_CTX + 10)))
    with pytest.raises(PromptTooLong):
        engine.generate(GenerationRequest("l", SamplingParams(20), prompt="a" * (N_CTX - 10)))


async def test_default_budget_fills_the_context(engine):
    prompt = "a" * (N_CTX - 3)
    n_prompt = len(engine.model.tokenize(prompt.encode(), True, True))
    req = GenerationRequest("f", SamplingParams(None, temperature=0), prompt=prompt)
    out = merge_deltas(await run(engine, req))
    assert out.completion_tokens == N_CTX - n_prompt and out.finish_reason == "length"


async def test_close_aborts_and_frees_the_model(engine):
    stream = engine.generate(chat(200, temperature=0))
    first = [await anext(stream) for _ in range(2)]
    await stream.aclose()
    out = merge_deltas(await asyncio.wait_for(run(engine, chat(3, temperature=0)), 30))
    assert len(first) == 2 and out.completion_tokens == 3


PROMPTS = ("hello world", "write me a poem about the sea", "abc", "one two three four")


def asked(i, max_tokens=16, **params):
    messages = (Message("system", "be brief"), Message("user", PROMPTS[i % len(PROMPTS)]))
    return GenerationRequest(str(i), SamplingParams(max_tokens, temperature=0, **params),
                             messages=messages)


async def test_batched_answers_equal_one_at_a_time(engine, tmp_path):
    """Four greedy generations decoded together are token-identical to the same four decoded
    one at a time (`n_parallel: 1`), which run in turn; with logprobs and a stop string too."""
    requests = [asked(i) for i in range(4)] + [asked(1, logprobs=2, stop=("e",))]
    steps = engine.batcher.steps
    together = await asyncio.gather(*(run(engine, r) for r in requests))
    assert engine.batcher.widest >= 4
    single = await started(engine.path, n_parallel=1)
    try:
        alone = await asyncio.gather(*(run(single, r) for r in requests))
        assert single.batcher.widest == 1
    finally:
        await single.close()
    for a, b in zip(together, alone):
        a, b = merge_deltas(a), merge_deltas(b)
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or (), b.logprobs or (), strict=True):  # batching moves the
            assert x.token == y.token and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]  # float sums a little
    assert engine.batcher.steps - steps < sum(len(merge_deltas(o).token_ids) for o in alone)


async def test_a_long_prompt_is_prefilled_in_chunks_beside_running_answers(tmp_path):
    """A long prompt arriving while an answer streams is evaluated `prefill_chunk` tokens a
    step: the running answer keeps getting tokens meanwhile."""
    eng = await started(write_tiny_gguf(tmp_path / "p.gguf"), prefill_chunk=8)
    order = []

    async def follow(name, request):
        async for d in eng.generate(request):
            order.append((name, len(d.token_ids)))

    try:
        running = asyncio.ensure_future(follow("short", chat(60, temperature=0)))
        while not order:
            await asyncio.sleep(0.001)
        long = GenerationRequest("l", SamplingParams(2, temperature=0), prompt="word " * 40)
        await asyncio.gather(running, follow("long", long))
    finally:
        await eng.close()
    first_long = next(i for i, (name, n) in enumerate(order) if name == "long" and n)
    short_before = sum(n for name, n in order[:first_long] if name == "short")
    assert short_before >= 1 + 160 // 8 // 2  # the prompt took ~20 steps; the answer moved on


async def test_a_shared_prefix_is_evaluated_once_per_slot(tmp_path):
    """The second prompt sharing a long prefix evaluates only what differs, and answers as a
    fresh engine does."""
    eng = await started(write_tiny_gguf(tmp_path / "s.gguf"), n_parallel=1)
    system = Message("system", "you are terse " * 12)
    one, two = ((system, Message("user", text)) for text in ("hi", "hello there"))
    try:
        await run(eng, GenerationRequest("a", SamplingParams(4, temperature=0), messages=one))
        held = list(eng.batcher._slots[0].held)
        second = GenerationRequest("b", SamplingParams(4, temperature=0), messages=two)
        before = eng.batcher.evaluated
        reused = merge_deltas(await run(eng, second))
        evaluated = eng.batcher.evaluated - before
    finally:
        await eng.close()
    fresh = await started(write_tiny_gguf(tmp_path / "s.gguf"), n_parallel=1)
    try:
        prompt = fresh.tokenize_request(second)
        alone = merge_deltas(await run(fresh, second))
    finally:
        await fresh.close()
    shared = next(i for i, (a, b) in enumerate(zip(held, prompt)) if a != b)
    assert shared > 40 and evaluated == len(prompt) - shared + 3  # the rest, then 3 answers
    assert reused.token_ids == alone.token_ids


def record_steps(engine) -> list[list[int]]:
    """From now on, each decode step's sequence ids, in batch order."""
    steps, decode = [], engine.batcher.ctx.decode

    def recording(batch):
        b = batch.batch
        steps.append([b.seq_id[j][0] for j in range(b.n_tokens)])
        decode(batch)

    engine.batcher.ctx.decode = recording
    return steps


async def admitted_together(engine, requests):
    """Start `requests` while the scheduler is held, so that one step admits them all, in
    order: slots 0, 1, 2, ... The tasks running them."""
    release = threading.Event()
    engine.batcher.call(release.wait)
    tasks = [asyncio.ensure_future(run(engine, r)) for r in requests]
    for _ in range(5000):
        if len(engine.batcher._queue) == len(requests):
            break
        await asyncio.sleep(0.001)
    release.set()
    return tasks


async def test_each_step_lists_its_sequences_in_slot_order(tmp_path):
    """llama.cpp evaluates a batch in one pass over the weights per run of consecutive sequence
    ids it meets in batch order. A generation that takes a freed slot below the running ones
    is still put first in the steps it shares with them."""
    eng = await started(write_tiny_gguf(tmp_path / "o.gguf"), n_parallel=3)
    steps = record_steps(eng)
    try:
        short, *long = await admitted_together(eng, [  # slots 0, 1 and 2
            chat(2, temperature=0, rid="x"), *(chat(None, temperature=0, rid=r) for r in "yz")])
        await short
        since = len(steps)
        late = await run(eng, chat(4, temperature=0, rid="w"))  # slot 0 again, beside y and z
        for task in long:
            task.cancel()
    finally:
        await eng.close()
    assert merge_deltas(late).completion_tokens == 4
    assert any(set(s) == {0, 1, 2} for s in steps[since:])  # w decoded beside y and z
    assert all(s == sorted(s) for s in steps)


async def test_a_new_generation_takes_a_slot_next_to_the_running_one(tmp_path):
    """A slot whose cache shares only a short prompt with the new generation loses to a slot
    next to the running ones: one pass over the weights a step, not two."""
    eng = await started(write_tiny_gguf(tmp_path / "n.gguf"), n_parallel=4)

    def say(text, max_tokens, rid):
        messages = (Message("system", "be brief"), Message("user", text))
        return GenerationRequest(rid, SamplingParams(max_tokens, temperature=0),
                                 messages=messages)

    texts = ("alpha one", "bravo two", "charlie three", "delta four")
    try:
        await asyncio.gather(*await admitted_together(eng, [say(t, 2, str(i))
                                                            for i, t in enumerate(texts)]))
        prompts = [eng.tokenize_request(say(t, 2, "x")) for t in texts]
        assert [s.held[:len(p)] for s, p in zip(eng.batcher._slots, prompts)] == prompts
        steps = record_steps(eng)
        running = asyncio.ensure_future(run(eng, say(texts[0], None, "a")))  # slot 0
        while not steps:
            await asyncio.sleep(0.001)
        await run(eng, say(texts[3], 3, "d"))  # slot 3 holds this very prompt
        running.cancel()
    finally:
        await eng.close()
    assert any(set(s) == {0, 1} for s in steps) and not any(3 in s for s in steps)


async def test_a_client_leaving_frees_its_slot_for_the_others(tmp_path):
    eng = await started(write_tiny_gguf(tmp_path / "l.gguf"), n_parallel=2)
    try:
        leaving = eng.generate(chat(200, temperature=0))
        await anext(leaving)
        staying = asyncio.ensure_future(run(eng, chat(30, temperature=0, rid="s")))
        await leaving.aclose()
        third = merge_deltas(await asyncio.wait_for(run(eng, chat(5, temperature=0)), 30))
        assert merge_deltas(await staying).completion_tokens == 30
        assert third.completion_tokens == 5
    finally:
        await eng.close()


async def test_eos_ends_with_stop(tmp_path):
    eng = await started(write_tiny_gguf(tmp_path / "eos.gguf", eos_first=True))
    try:
        out = merge_deltas(await run(eng, chat(10, temperature=0, logprobs=1)))
    finally:
        await eng.close()
    assert out.finish_reason == "stop"
    assert out.token_ids == (4,) and out.completion_tokens == 1 and out.text == ""
    assert out.logprobs[0].token == "<|im_end|>"


async def test_missing_file_and_missing_template(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        await started(tmp_path / "absent.gguf")
    eng = await started(write_tiny_gguf(tmp_path / "plain.gguf", chat_template=None))
    try:
        with pytest.raises(EngineError, match="chat template"):
            eng.generate(chat())
        req = GenerationRequest("p", SamplingParams(2, temperature=0), prompt="abc")
        assert merge_deltas(await run(eng, req)).completion_tokens == 2
    finally:
        await eng.close()


async def test_close_fails_waiting_generations_with_an_error(tmp_path):
    eng = await started(write_tiny_gguf(tmp_path / "c.gguf"))
    release = threading.Event()
    eng.batcher.call(release.wait)  # occupy the scheduler: the next generation has to wait
    stream = eng.generate(chat(20, temperature=0))
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(eng.close())
    await asyncio.sleep(0.05)
    release.set()
    await closing
    with pytest.raises(EngineError, match="closing"):
        await first
