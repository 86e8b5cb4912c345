"""TransformersEngine on a tiny random Llama and a word-level ChatML tokenizer built in code."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import threading

import pytest
import pytest_asyncio
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from serving.engines import (
    GenerationRequest,
    Message,
    PromptTooLong,
    SamplingParams,
    build_engine,
    merge_deltas,
)
from serving.engines.config import TransformersEngine as TransformersConfig
from serving.engines.transformers import TransformersEngine
from tests.workerengine import run_together

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "system user assistant hello world the a quick brown fox jumps over lazy dog red green "
    "blue one two three four five six seven eight nine ten alpha beta gamma delta sun moon "
    "star river stone tree leaf wind rain snow fire water earth sky cloud light dark"
).split()
CONTEXT = 128
# The same tests run on a GPU with PROTEGE_TEST_DEVICE=cuda (CPU by default, as in CI).
DEVICE = os.environ.get("PROTEGE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    eos = vocab["<|im_end|>"]
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaky distributions: sampling is not uniform noise
        model.lm_head.weight[eos] = 0  # logit 0: greedy never ends by itself
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_dir):
    cfg = TransformersConfig(model=str(model_dir), device=DEVICE)
    eng = build_engine(cfg, resolve_path=lambda p: p)
    assert isinstance(eng, TransformersEngine)
    await eng.start()
    yield eng
    await eng.close()


pytestmark = pytest.mark.asyncio(loop_scope="module")

MESSAGES = (Message("system", "hello world"), Message("user", "the quick brown fox"))


def chat(max_tokens=12, rid="r", **params):
    return GenerationRequest(rid, SamplingParams(max_tokens, **params), messages=MESSAGES)


async def run(engine, request):
    return [d async for d in engine.generate(request)]


async def test_info_after_start(engine):
    assert engine.info.context_window == CONTEXT
    assert engine.info.supports_logprobs and engine.info.max_concurrency == 4  # n_parallel


async def test_greedy_matches_hf_generate_and_counts(engine):
    deltas = await run(engine, chat(12, temperature=0))
    out = merge_deltas(deltas)
    tok = engine.tokenizer
    prompt_ids = tok(
        tok.apply_chat_template([{"role": m.role, "content": m.content} for m in MESSAGES],
                                tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert out.prompt_tokens == len(prompt_ids)
    assert out.completion_tokens == len(out.token_ids) == 12
    assert out.finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    # Streamed text equals the non-streamed decode of the same ids.
    assert out.text == tok.decode(list(out.token_ids), skip_special_tokens=True)
    # The hand-written KV-cache loop agrees with transformers' own greedy generate.
    with torch.inference_mode():
        ref = engine.model.generate(
            torch.tensor([prompt_ids], device=DEVICE), max_new_tokens=12, do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=DEVICE),
        )
    assert list(out.token_ids) == ref[0, len(prompt_ids):].tolist()
    again = merge_deltas(await run(engine, chat(12, temperature=0, rid="other")))
    assert again.token_ids == out.token_ids and again.text == out.text


async def test_completion_prompt(engine):
    req = GenerationRequest("c", SamplingParams(5, temperature=0), prompt="red green blue")
    out = merge_deltas(await run(engine, req))
    assert out.prompt_tokens == 3 and out.completion_tokens == 5


async def test_stop_string_cuts_text(engine):
    full = merge_deltas(await run(engine, chat(20, temperature=0)))
    words = full.text.split()
    stop = " " + words[4]
    expected = full.text[: full.text.index(stop)]
    out = merge_deltas(await run(engine, chat(20, temperature=0, stop=(stop,))))
    assert out.text == expected
    assert out.finish_reason == "stop"
    assert out.completion_tokens == len(out.token_ids) < 20


async def test_logprobs_are_sane(engine):
    plain = merge_deltas(await run(engine, chat(6, temperature=0)))
    out = merge_deltas(await run(engine, chat(6, temperature=0, logprobs=3)))
    assert out.token_ids == plain.token_ids
    assert len(out.logprobs) == 6
    for token_id, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0] == (lp.token, pytest.approx(lp.logprob))  # greedy picks the best
        assert lp.token == engine.tokenizer.decode([token_id])
    zero = merge_deltas(await run(engine, chat(2, temperature=0, logprobs=0)))
    assert all(lp.top == () for lp in zero.logprobs)
    assert plain.logprobs is None


async def test_seed_reproducible_at_temperature_one(engine):
    a = merge_deltas(await run(engine, chat(16, temperature=1.0, seed=7)))
    b = merge_deltas(await run(engine, chat(16, temperature=1.0, seed=7)))
    c = merge_deltas(await run(engine, chat(16, temperature=1.0, seed=8)))
    greedy = merge_deltas(await run(engine, chat(16, temperature=0)))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids


async def test_tiny_top_p_is_greedy(engine):
    greedy = merge_deltas(await run(engine, chat(10, temperature=0)))
    nucleus = merge_deltas(await run(engine, chat(10, temperature=1.0, top_p=1e-6, seed=3)))
    assert nucleus.token_ids == greedy.token_ids


async def test_eos_ends_with_stop(engine):
    eos = engine.tokenizer.eos_token_id
    bias = torch.zeros(engine.model.config.vocab_size, device=DEVICE)
    bias[eos] = 1e4
    hook = engine.model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        deltas = await run(engine, chat(10, temperature=0))
    finally:
        hook.remove()
    out = merge_deltas(deltas)
    assert out.finish_reason == "stop"
    assert out.token_ids == (eos,) and out.completion_tokens == 1
    assert out.text == ""


async def test_prompt_too_long_and_default_budget(engine):
    long = GenerationRequest("l", SamplingParams(None), prompt="one " * (CONTEXT + 1))
    with pytest.raises(PromptTooLong):
        engine.generate(long)
    with pytest.raises(PromptTooLong):
        engine.generate(GenerationRequest("l", SamplingParams(10), prompt="one " * (CONTEXT - 5)))
    words = "one " * (CONTEXT - 3)
    fill = GenerationRequest("f", SamplingParams(None, temperature=0), prompt=words)
    out = merge_deltas(await run(engine, fill))
    assert out.completion_tokens == 3 and out.finish_reason == "length"


async def test_close_aborts_between_tokens(engine):
    calls, closed = [], threading.Event()

    def forward_hook(*_):
        calls.append(1)
        if len(calls) == 3:  # hold the worker until the consumer has closed, however slow it is
            closed.wait(30)

    hook = engine.model.register_forward_hook(forward_hook)
    try:
        stream = engine.generate(chat(CONTEXT - 20, temperature=0))
        first = [await anext(stream) for _ in range(2)]
        await stream.aclose()
        closed.set()
        # The worker notices at its next token; afterwards it runs the next request at once.
        nxt = merge_deltas(await asyncio.wait_for(run(engine, chat(3, temperature=0)), 30))
    finally:
        closed.set()
        hook.remove()
    assert len(first) == 2 and nxt.completion_tokens == 3
    assert len(calls) <= 3 + 3  # nowhere near the 100 forwards the first request wanted


async def test_requests_run_one_at_a_time_and_all_finish(engine, monkeypatch):
    """Requests sent together are all queued before the first ends; one token loop runs at a
    time (a batch of them, or one) and each finishes."""
    merged, events, most = await run_together(
        engine, monkeypatch, [chat(4, temperature=0, rid=str(i)) for i in range(3)])
    assert len({m.token_ids for m in merged}) == 1
    assert all(m.completion_tokens == 4 for m in merged)
    assert events == ["submit"] * 3 + ["finish"] * 3  # concurrent: all sent before one ended
    assert most == 1


async def test_a_batch_answers_as_one_at_a_time(model_dir):
    """Prompts of different lengths decoded in one left-padded batch give the tokens (and
    logprobs, stop strings) each gives alone (`n_parallel: 1`)."""
    texts = ["the quick brown fox", "hello", "a b c d e f g h i j", "world"]
    requests = [GenerationRequest(str(i), SamplingParams(8, temperature=0, **extra),
                                  messages=(Message("user", text),))
                for i, (text, extra) in enumerate(zip(texts, [{}, {"logprobs": 2}, {},
                                                              {"stop": ("o",)}]))]

    async def answers(n_parallel):
        eng = build_engine(TransformersConfig(model=str(model_dir), device=DEVICE,
                                              n_parallel=n_parallel), resolve_path=lambda p: p)
        await eng.start()
        sizes, decode = [], eng._decode
        eng._decode = lambda jobs: (sizes.append(len(jobs)), decode(jobs))[1]
        release = threading.Event()
        eng._pool.submit(release.wait)  # all four are waiting when the first batch starts
        try:
            pending = [asyncio.ensure_future(run(eng, r)) for r in requests]
            await asyncio.sleep(0.05)
            release.set()
            return [merge_deltas(o) for o in await asyncio.gather(*pending)], sizes
        finally:
            release.set()
            await eng.close()

    together, sizes = await answers(4)
    alone, sizes_alone = await answers(1)
    assert sizes == [4] and sizes_alone == [1, 1, 1, 1]
    for a, b in zip(together, alone, strict=True):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        for x, y in zip(a.logprobs or (), b.logprobs or (), strict=True):
            assert x.token == y.token and x.logprob == pytest.approx(y.logprob, abs=1e-4)
    assert together[1].logprobs and together[3].text == alone[3].text
