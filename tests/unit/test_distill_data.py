"""distill.data on a word-level ChatML tokenizer built in code, and the shipped prompt set."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distill.data import (
    IGNORE,
    bucket_batches,
    load_chat_examples,
    load_prompts,
    pack,
    split_by_hash,
    tokenize_all,
    tokenize_example,
)
from shadow.export import select, write_examples
from tests.unit.test_records import make_record

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["system", "user", "assistant", "you", "are", "helpful", "what", "is", "the", "capital",
         "of", "france", "paris", "it", "a", "b", "c", "d", "e", "f", "g", "h", "question",
         "answer", "teacher", *"0123456789", "—", "é", "✓"]
PROMPTS = Path(__file__).resolve().parents[2] / "examples" / "prompts"


def word_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|im_end|>", pad_token="<unk>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = template
    fast.name_or_path = "word-chatml"  # what the errors name
    return fast


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "you are helpful"},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


# --- loading ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_round_trip(tmp_path, fmt):
    pairs = [make_record(i) for i in range(6)]
    counts = write_examples(select(pairs, [], [], 0.5), tmp_path, fmt)
    rows = [e for split in ("train", "validation") if counts[split]
            for e in load_chat_examples(tmp_path / f"{split}.{fmt}")]
    assert len(rows) == 6
    by_id = {r["id"]: r for r in rows}
    first = by_id["chatcmpl-00000"]
    assert first["messages"] == [{"role": "user", "content": "question 0 — é ✓"},
                                 {"role": "assistant", "content": "teacher answer 0"}]
    assert first["teacher_logprobs"] == make_record(0).teacher_logprobs  # parsed, not JSON text
    assert first["route"] == "default"
    train, validation = split_by_hash(rows, 0.5)
    assert {r["id"] for r in validation} == {r["id"] for r in rows if r["split"] == "validation"}
    assert len(train) + len(validation) == 6


def test_load_chat_examples_errors(tmp_path):
    bad = tmp_path / "pairs.csv"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'"):
        load_chat_examples(bad)
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no examples in .*protege dataset export"):
        load_chat_examples(empty)
    no_messages = tmp_path / "a.jsonl"
    no_messages.write_text(json.dumps({"id": "x", "messages": []}) + "\n")
    with pytest.raises(ValueError, match="line 1: no messages"):
        load_chat_examples(no_messages)
    unanswered = tmp_path / "b.jsonl"
    unanswered.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="not the assistant's"):
        load_chat_examples(unanswered)
    garbage = tmp_path / "c.jsonl"
    garbage.write_text("{nope\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        load_chat_examples(garbage)


def test_load_prompts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("what is the capital of france\n\n  a b c  \n")
    assert load_prompts(txt) == [[{"role": "user", "content": "what is the capital of france"}],
                                 [{"role": "user", "content": "a b c"}]]
    jsonl = tmp_path / "p.jsonl"
    system_user = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    jsonl.write_text(json.dumps({"prompt": "a b"}) + "\n"
                     + json.dumps({"messages": system_user}) + "\n")
    assert load_prompts(jsonl) == [[{"role": "user", "content": "a b"}], system_user]
    answered = tmp_path / "q.jsonl"
    answered.write_text(json.dumps({"messages": chat("a", "b")}) + "\n")
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        load_prompts(answered)
    (tmp_path / "e.txt").write_text(" \n")
    with pytest.raises(ValueError, match="no prompts in"):
        load_prompts(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="unknown extension"):
        load_prompts(tmp_path / "p.parquet")


# --- tokenizing -------------------------------------------------------------------------------

def test_masking_is_exact(tok):
    messages = chat("what is the capital of france", "paris")
    e = tokenize_example(tok, messages, max_length=64)
    full = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    prompt = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    assert e["input_ids"] == full  # the concatenation is the template's own tokenization
    assert len(e["labels"]) == len(e["input_ids"])
    n = len(prompt)
    assert e["labels"][:n] == [IGNORE] * n
    learned = [(i, t) for i, t in enumerate(e["labels"]) if t != IGNORE]
    assert [i for i, _ in learned] == list(range(n, n + 2))  # answer + <|im_end|>, no shift
    assert all(e["input_ids"][i] == t for i, t in learned)
    assert tok.decode([t for _, t in learned]) == "paris <|im_end|>"
    assert e["labels"][n + 2:] == [IGNORE] * (len(full) - n - 2)  # the template's trailing text


def test_truncation_keeps_the_prompt_start(tok):
    messages = chat("what is the capital of france", "it is paris a b c d")
    whole = tokenize_example(tok, messages, max_length=1000)
    n_prompt = whole["labels"].index(next(t for t in whole["labels"] if t != IGNORE))
    cut = tokenize_example(tok, messages, max_length=n_prompt + 2)
    assert cut["input_ids"] == whole["input_ids"][:n_prompt + 2]
    assert cut["labels"] == whole["labels"][:n_prompt + 2]
    assert tokenize_example(tok, messages, max_length=n_prompt) is None  # answer fully cut off
    kept, skipped = tokenize_all(tok, [messages, chat("a", "b")], max_length=n_prompt)
    assert skipped == 1 and len(kept) == 1


def test_an_answer_merging_into_the_header_is_tokenized_as_generated():
    # Byte-level BPE (as SmolLM2 and Qwen): "assistant\n" + "\n\nthe answer" merges "\n\n".
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["hello\n\nworld\n\n\nthe answer\n\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    tok.chat_template = CHATML
    for answer in ("the answer", "\n\nthe answer"):
        messages = chat("hello", answer)
        e = tokenize_example(tok, messages, max_length=256)
        prompt = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        full = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert e["input_ids"][:len(prompt)] == prompt
        assert e["labels"][:len(prompt)] == [IGNORE] * len(prompt)
        assert tok.decode(e["input_ids"]) == tok.decode(full)
        assert (e["input_ids"] == full) == (answer == "the answer")  # "\n\n" merged only in full
        assert tok.decode([t for t in e["labels"] if t != IGNORE]) == answer + "<|im_end|>"


def test_tokenize_errors():
    with pytest.raises(ValueError, match="'word-chatml' has no chat template: set `tokenizer"):
        tokenize_example(word_tokenizer(None), chat("a", "b"), max_length=32)
    with pytest.raises(ValueError, match="must be the assistant's answer"):
        tokenize_example(word_tokenizer(), chat("a", "b")[:-1], max_length=32)
    # A template whose generation prompt differs from how it renders an answered turn.
    odd = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>teacher\n{% endif %}")
    with pytest.raises(ValueError, match="chat template of tokenizer 'word-chatml'"):
        tokenize_example(word_tokenizer(odd), chat("a", "b"), max_length=32)


# --- batching ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def examples(tok):
    answers = ["a", "b c", "d e f", "paris", "it is paris", "g h 1 2 3 4", "5", "6 7 8 9"]
    questions = ["what is a", "question 1", "the capital of france", "b", "c d e", "f", "g h",
                 "question 2 3"]
    return [tokenize_example(tok, chat(q, a), max_length=64) for q, a in zip(questions, answers)]


def test_pack(examples):
    max_length = 40
    batches = pack(examples, max_length=max_length, pad_id=0, batch_size=2)
    seen, rows = [], 0
    for b in batches:
        assert set(b) == {"input_ids", "labels", "position_ids", "attention_mask"}
        assert all(t.dtype == torch.long for t in b.values())
        assert b["input_ids"].shape[1] <= max_length
        for ids, labels, pos, mask in zip(b["input_ids"], b["labels"], b["position_ids"],
                                          b["attention_mask"]):
            rows += 1
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert (ids[n:] == 0).all() and (labels[n:] == IGNORE).all()
            starts = [i for i in range(n) if pos[i] == 0]
            for s, e in zip(starts, [*starts[1:], n]):
                assert pos[s:e].tolist() == list(range(e - s))
                seen.append((ids[s:e].tolist(), labels[s:e].tolist()))
    assert rows > 1 and rows < len(examples)  # several examples share a row
    assert sorted(seen) == sorted((e["input_ids"], e["labels"]) for e in examples)
    with pytest.raises(ValueError, match="does not fit max_length=5"):
        pack(examples, max_length=5, pad_id=0)


def test_bucket_batches(examples):
    batches = bucket_batches(examples, batch_size=3, pad_id=0, seed=1)
    assert [len(b["input_ids"]) for b in batches].count(3) == 2 and len(batches) == 3
    got = []
    for b in batches:
        assert set(b) == {"input_ids", "labels", "attention_mask"}
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert (ids[n:] == 0).all() and (labels[n:] == IGNORE).all()
            got.append((ids[:n].tolist(), labels[:n].tolist()))
        assert int(b["attention_mask"].sum(1).max()) == b["input_ids"].shape[1]  # its longest
    assert sorted(got) == sorted((e["input_ids"], e["labels"]) for e in examples)
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert sorted(int(b["attention_mask"].sum(1).min()) for b in batches) == sorted(
        lengths[i] for i in range(0, len(lengths), 3))  # buckets of neighbouring lengths

    def order(seed):
        return [b["input_ids"].tolist() for b in bucket_batches(examples, batch_size=3,
                                                                pad_id=0, seed=seed)]

    assert order(1) == order(1)
    assert any(order(s) != order(1) for s in range(2, 6))


# --- the shipped prompt set -------------------------------------------------------------------

def test_prompt_set_loads_and_is_balanced():
    path = PROMPTS / "enterprise.jsonl"
    prompts = load_prompts(path)
    assert len(prompts) >= 300
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["messages"] for r in rows] == prompts
    counts = Counter(r["task"] for r in rows)
    assert set(counts) == {"classification", "extraction", "qa", "summarization"}
    assert min(counts.values()) >= 60
    users = [r["messages"][-1]["content"] for r in rows]
    assert len(set(users)) == len(users)
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        if r["task"] == "classification":
            assert r["reference"] in r["labels"]
        if r["task"] in ("extraction", "qa"):
            assert r["reference"] is not None
    train, validation = split_by_hash(prompts, 0.1)
    assert 0 < len(validation) < len(prompts) // 4
    assert split_by_hash(prompts, 0.1) == (train, validation)


def test_generator_is_deterministic(tmp_path):
    out = tmp_path / "enterprise.jsonl"
    subprocess.run([sys.executable, str(PROMPTS / "generate.py"), str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == (PROMPTS / "enterprise.jsonl").read_bytes()
