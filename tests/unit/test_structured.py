"""Structured outputs: `response_format` parsing and refusals, the compiled grammar, and the
engines that enforce it (llama.cpp and transformers on tiny random models built in code: random
weights write JSON only because the grammar leaves them no choice)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import numpy as np
import pytest

from serving.engines import (
    GenerationRequest,
    Message,
    PromptTooLong,
    SamplingParams,
    Unsupported,
    build_engine,
    merge_deltas,
)
from serving.engines.config import LlamaCppEngine as LlamaCppConfig
from serving.engines.config import TransformersEngine as TransformersConfig
from serving.engines.constrain import sample
from serving.engines.structured import (
    FormatError,
    ResponseFormat,
    check_answer,
    choice_of,
    grammar_for,
    parse_response_format,
)
from serving.protocol import parse_request
from tests.unit.test_engine_llamacpp import write_tiny_gguf
from tests.unit.test_gguf import bpe_tokenizer, save, tiny_model

TICKET = {
    "type": "object",
    "properties": {
        "urgent": {"type": "boolean"},
        "team": {"enum": ["billing", "network", "account"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 4},
    },
    "required": ["urgent", "team", "priority"],
    "additionalProperties": False,
}


def schema_format(schema=TICKET, name="ticket", **extra):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, **extra}}


def refusal(value) -> FormatError:
    with pytest.raises(FormatError) as e:
        parse_response_format(value)
    return e.value


# -- parsing ------------------------------------------------------------------------------------


def test_text_and_absent_ask_for_nothing():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None


def test_json_object_and_json_schema():
    assert parse_response_format({"type": "json_object"}) == ResponseFormat("json_object")
    fmt = parse_response_format(schema_format(strict=True, description="a ticket"))
    assert (fmt.type, fmt.name, fmt.strict, fmt.description) == (
        "json_schema", "ticket", True, "a ticket")
    assert json.loads(fmt.schema) == TICKET
    # the canonical text does not depend on key order: one cache entry per schema
    shuffled = dict(reversed(list(TICKET.items())))
    assert parse_response_format(schema_format(shuffled)).schema == fmt.schema
    assert fmt.openai() == {"type": "json_schema", "json_schema": {
        "name": "ticket", "schema": TICKET, "strict": True, "description": "a ticket"}}


@pytest.mark.parametrize("value, param, words", [
    ("json", "response_format", "expected an object"),
    ({"type": "xml"}, "response_format.type", "'text', 'json_object' and 'json_schema'"),
    ({}, "response_format.type", "nothing"),
    ({"type": "json_schema"}, "response_format.json_schema", "Missing required parameter"),
    (schema_format(name="has space"), "response_format.json_schema.name", "1 to 64"),
    (schema_format(name="x" * 65), "response_format.json_schema.name", "1 to 64"),
    (schema_format(name="ticket\n"), "response_format.json_schema.name", "1 to 64"),
    (schema_format(strict="yes"), "response_format.json_schema.strict", "a boolean"),
    (schema_format(schema=[1]), "response_format.json_schema.schema", "an array"),
    (schema_format(schema={"type": "foo"}), "response_format.json_schema.schema",
     "not a valid JSON Schema at type"),
    (schema_format(schema={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
     "response_format.json_schema.schema", "'not' cannot be enforced"),
    (schema_format(schema={"type": "array", "uniqueItems": True}),
     "response_format.json_schema.schema", "'uniqueItems' cannot be enforced"),
])
def test_refusals_name_the_field_and_the_reason(value, param, words):
    e = refusal(value)
    assert e.param == param and words in e.message


def test_the_request_parser_turns_a_refusal_into_a_400_naming_the_keyword():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": schema_format({"type": "array", "uniqueItems": True})}
    with pytest.raises(Exception) as e:
        parse_request("chat", json.dumps(body))
    assert e.value.status == 400 and e.value.param == "response_format.json_schema.schema"
    assert "uniqueItems" in e.value.message
    body["response_format"] = schema_format()
    request = parse_request("chat", json.dumps(body))
    assert request.ignored_fields() == ()
    assert all(r.params.response_format == request.response_format
               for r in request.to_generation_requests("id"))


def test_the_grammar_is_compiled_once_per_schema():
    fmt = parse_response_format(schema_format())
    assert grammar_for(fmt) is grammar_for(parse_response_format(schema_format()))


def test_check_answer():
    fmt = parse_response_format(schema_format())
    assert check_answer(fmt, '{"urgent": true, "team": "network", "priority": 2}') is None
    assert "not JSON" in check_answer(fmt, '{"urgent": true')
    assert "at priority" in check_answer(fmt, '{"urgent": true, "team": "network", "priority": 9}')
    assert "(root)" in check_answer(fmt, '{"urgent": true, "team": "network"}')
    assert check_answer(ResponseFormat("json_object"), "[1]") is not None
    assert check_answer(ResponseFormat("json_object"), '{"any": [1]}') is None


def test_a_choice_is_one_label_and_has_no_openai_form():
    labels = choice_of(["yes", "no"])
    assert check_answer(labels, "yes") is None and check_answer(labels, " yes") is not None
    assert labels.openai() is None  # a remote upstream gets no response_format for it
    assert grammar_for(labels) is grammar_for(choice_of(["yes", "no"]))


def test_a_constrained_route_needs_labels():
    from serving.config import RouteConfig

    assert RouteConfig(variant="v", labels=["a", "b"], constrain=True).constrain
    for bad in ({"constrain": True}, {"labels": ["a", ""], "constrain": True}):
        with pytest.raises(ValueError, match="constrain: true needs"):
            RouteConfig(variant="v", **bad)


def test_sample_draws_only_allowed_tokens():
    import numpy as np

    rng = np.random.default_rng(0)
    logits = np.array([5.0, -np.inf, 0.0, -np.inf, 1.0])
    assert sample(logits, 0.0, 1.0, rng) == 0
    drawn = {sample(logits, 2.0, 1.0, rng) for _ in range(300)}
    assert drawn == {0, 2, 4}
    assert {sample(logits, 1.0, 0.5, rng) for _ in range(50)} == {0}  # the nucleus is token 0


# -- engines ------------------------------------------------------------------------------------

MESSAGES = (Message("user", "file a ticket"),)


def request(fmt, seed=None, temperature=1.0, max_tokens=120, rid="r"):
    params = SamplingParams(max_tokens, temperature=temperature, seed=seed, response_format=fmt)
    return GenerationRequest(rid, params, messages=MESSAGES)


async def answers(engine, fmt, seeds, max_tokens=100):
    out = []
    for seed in seeds:
        deltas = [d async for d in engine.generate(request(fmt, seed, max_tokens=max_tokens))]
        out.append((deltas, merge_deltas(deltas)))
    return out


async def assert_enforced(engine):
    """Every answer of a random model conforms, seeded answers repeat, free text does not."""
    ticket = parse_response_format(schema_format())
    for deltas, out in await answers(engine, ticket, range(6)):
        assert out.finish_reason == "stop", out.text
        assert check_answer(ticket, out.text) is None, out.text
        assert len(deltas) > 3  # streamed piece by piece, not in one block
    any_object = ResponseFormat("json_object")
    for _, out in await answers(engine, any_object, range(3)):
        assert out.finish_reason == "length" or check_answer(any_object, out.text) is None
        assert out.text.lstrip().startswith("{")
    labels = choice_of(["billing", "network", "account manager", 'say "hi"'])
    got = {out.text for _, out in await answers(engine, labels, range(8))}
    assert got and got <= set(labels.labels)  # exactly a label: nothing before or after
    first = await answers(engine, ticket, [7, 7])
    assert first[0][1].text == first[1][1].text
    free = await answers(engine, None, range(3))
    assert all(check_answer(ticket, out.text) is not None for _, out in free)


def gguf_reference(path):
    """log P(token | ids before it) for each of `tokens` after `prompt`, from a separate
    llama.cpp context that keeps every position's logits (`logits_all`)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)

    def reference(prompt, tokens):
        llm.reset()
        llm.eval(prompt + tokens)
        rows = llm.scores[len(prompt) - 1:len(prompt) + len(tokens) - 1].astype(np.float64)
        return _log_softmax(rows), llm.token_eos()

    return reference


def hf_reference(folder):
    """The same from one transformers forward pass over prompt and answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = AutoTokenizer.from_pretrained(folder).eos_token_id

    def reference(prompt, tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0].double().numpy()
        return _log_softmax(logits[len(prompt) - 1:-1]), eos

    return reference


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


async def assert_scores(engine, reference):
    """`score` equals the reference, token by token, with EOS appended only when `end`; an
    answer past the context window is refused."""
    prompt = engine.tokenize_request(GenerationRequest("r", SamplingParams(1), messages=MESSAGES))
    answer = "billing, network and the account manager " * 2
    scores = await engine.score(MESSAGES, answer, end=True)
    logprobs, eos = reference(prompt, scores.tokens.tolist())
    assert scores.tokens[-1] == eos and len(scores.tokens) > 20
    assert scores.tokens[:-1].tolist() == engine._text_tokens(answer)
    rows = np.arange(len(scores.tokens))
    assert scores.logprob == pytest.approx(logprobs[rows, scores.tokens], abs=1e-4)
    assert scores.top_logprob == pytest.approx(logprobs.max(axis=-1), abs=1e-4)
    assert (scores.correct == (logprobs.argmax(axis=-1) == scores.tokens)).all()
    unended = await engine.score(MESSAGES, answer)
    assert unended.tokens.tolist() == scores.tokens[:-1].tolist()
    with pytest.raises(PromptTooLong):
        await engine.score(MESSAGES, "billing " * 2000)


async def assert_label_probs(engine, reference):
    """A label answer asked with logprobs carries P(label | prompt), equal to the reference's
    teacher-forced sequence logprobs softmaxed over the labels; without logprobs, none."""
    labels = choice_of(["billing", "network", "account manager"])
    asked = SamplingParams(20, seed=3, response_format=labels, logprobs=0)
    for params in (asked, SamplingParams(20, seed=3, response_format=labels)):
        out = merge_deltas([d async for d in engine.generate(
            GenerationRequest("r", params, messages=MESSAGES))])
        assert out.text in labels.labels
    assert out.label_probs is None
    got = merge_deltas([d async for d in engine.generate(
        GenerationRequest("r", asked, messages=MESSAGES))]).label_probs
    prompt = engine.tokenize_request(GenerationRequest("r", asked, messages=MESSAGES))
    scores = []
    for label in labels.labels:
        tokens = engine._text_tokens(label)
        logprobs, _ = reference(prompt, tokens)
        scores.append(logprobs[np.arange(len(tokens)), tokens].sum())
    weights = np.exp(np.array(scores) - max(scores))
    expected = dict(zip(labels.labels, (weights / weights.sum()).tolist()))
    assert list(got) == list(expected)
    assert got == pytest.approx(expected, abs=1e-4)
    assert sum(got.values()) == pytest.approx(1.0)


async def test_llamacpp_enforces_the_schema_and_scores(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    # n_batch 8: a scored answer spans several batches.
    engine = build_engine(LlamaCppConfig(path=str(path), n_ctx=256, n_threads=1, n_batch=8),
                          resolve_path=lambda p: p)
    await engine.start()
    reference = gguf_reference(path)
    try:
        await assert_enforced(engine)
        await assert_label_probs(engine, reference)
        await assert_scores(engine, reference)
        await assert_enforced(engine)  # scoring left the context's prefix cache coherent
    finally:
        await engine.close()


async def test_transformers_enforces_the_schema_and_scores(tmp_path):
    tokenizer = bpe_tokenizer()
    folder = save(tmp_path / "tiny", tiny_model("llama", tokenizer), tokenizer)
    engine = build_engine(TransformersConfig(model=str(folder)), resolve_path=lambda p: p)
    await engine.start()
    try:
        await assert_enforced(engine)
        reference = hf_reference(folder)
        await assert_label_probs(engine, reference)
        await assert_scores(engine, reference)
    finally:
        await engine.close()


async def test_the_fake_engine_refuses_a_response_format():
    from serving.engines.config import FakeEngine

    engine = build_engine(FakeEngine(), resolve_path=lambda p: p)
    with pytest.raises(Unsupported) as e:
        engine.generate(request(ResponseFormat("json_object")))
    assert e.value.param == "response_format"
    with pytest.raises(Unsupported) as e:  # no token probabilities to score with
        await engine.score(MESSAGES, "an answer")
    assert e.value.param == "score"
