"""distill.fidelity: the pure metrics by hand, the model wrappers on tiny random Llamas built in
code (nothing downloaded)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from distill.data import IGNORE, bucket_batches, tokenize_all
from distill.fidelity import (
    fidelity_report,
    generation_fidelity,
    greedy_answers,
    logit_fidelity,
    mean_kl,
    next_token_mask,
    perplexity,
    teacher_text_perplexity,
    text_fidelity,
    top1_agreement,
)
from tests.unit.test_student_init import EOS, VOCAB, tiny_llama, word_tokenizer

CHATS = [
    ("hello world", "the quick brown fox jumps over the lazy dog"),
    ("one two three", "four five six"),
    ("red green", "blue"),
    ("sun moon star", "river stone tree leaf wind rain"),
    ("alpha", "beta gamma delta"),
]
PROMPTS = ["hello world", "one two three", "sun moon star"]


def chat(question, answer):
    return [{"role": "system", "content": "hello"}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    kept, cut = tokenize_all(tokenizer, [chat(q, a) for q, a in CHATS], max_length=64)
    assert not cut
    return kept


def batches(examples, size=2):
    return bucket_batches(examples, batch_size=size, pad_id=0, seed=0)


def talker(seed):
    """A tiny Llama that never ends by itself (EOS logit 0), so greedy answers are long."""
    model = tiny_llama(layers=2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight[EOS] = 0
    return model


@pytest.fixture(scope="module")
def teacher():
    return talker(0)


@pytest.fixture(scope="module")
def student(teacher):
    """The teacher with noise on its decoder layers: a partly faithful student."""
    model = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


# --- pure metrics ------------------------------------------------------------------------------


def test_next_token_mask():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, 8, 9]])
    assert next_token_mask(labels).tolist() == [[False, True, True, False, False],
                                                [True, False, True, True, False]]


def test_perplexity_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 2.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE]])
    # logits at 0 score labels[1] = 1, logits at 1 score labels[2] = 2; positions 2, 3 not counted
    ce1 = -(0.0 - math.log(math.exp(2) + math.exp(0) + math.exp(-1)))
    ce2 = -(3.0 - math.log(2 * math.exp(0.5) + math.exp(3)))
    assert perplexity(logits, labels) == pytest.approx(math.exp((ce1 + ce2) / 2), rel=1e-6)
    uniform = torch.zeros(2, 4, 7)
    assert perplexity(uniform, torch.tensor([[0, 1, 2, 3], [IGNORE, 4, 5, 6]])) == pytest.approx(7)


def test_perplexity_convention_matches_transformers_loss(teacher, examples):
    ids = torch.tensor([examples[0]["input_ids"]])
    labels = torch.tensor([examples[0]["labels"]])
    with torch.no_grad():
        out = teacher(input_ids=ids, labels=labels)
    assert perplexity(out.logits, labels) == pytest.approx(math.exp(out.loss.item()), rel=1e-5)


def test_top1_and_kl_by_hand():
    s = torch.tensor([[[3.0, 1.0], [0.0, 2.0], [1.0, 0.0]]])
    t = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    assert top1_agreement(s, t) == pytest.approx(2 / 3)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                        reduction="none").sum(-1).mean()
    assert mean_kl(s, t) == pytest.approx(expected.item(), rel=1e-6)
    assert mean_kl(t, t) == 0.0 and top1_agreement(t, t) == 1.0
    assert mean_kl(s, t, temperature=2.0) == pytest.approx(
        4 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
                     reduction="none").sum(-1).mean().item(), rel=1e-6)


def test_masked_positions_do_not_count():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    wild_s, wild_t = s.clone(), t.clone()
    wild_s[~mask] = torch.randn(int((~mask).sum()), 11) * 1e4
    wild_t[~mask] = float("nan")
    assert top1_agreement(wild_s, wild_t, mask) == top1_agreement(s[mask][None], t[mask][None])
    assert mean_kl(wild_s, wild_t, mask) == pytest.approx(mean_kl(s[mask][None], t[mask][None]))
    labels = torch.tensor([[IGNORE, 3, IGNORE, 4, IGNORE], [IGNORE, IGNORE, 5, 6, 7]])
    counted = next_token_mask(labels)
    assert counted.tolist() == mask.tolist()
    assert perplexity(wild_s, labels) == pytest.approx(perplexity(s, labels))
    with pytest.raises(ValueError, match="no counted token"):
        mean_kl(s, t, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="no counted token"):
        perplexity(s, torch.full((2, 5), IGNORE))
    with pytest.raises(ValueError, match="same"):
        top1_agreement(s, t[..., :10])


def test_text_fidelity_with_a_fake_embedder():
    vectors = {"a b": [1.0, 0.0], "c d": [1.0, 1.0], "x y": [1.0, 0.0], "e": [-1.0, 0.0]}
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return [vectors[t] for t in texts]

    scores = text_fidelity(["a b", "c d", "e"], ["a b", "x y", "x y"], embed=embed)
    assert calls == [["a b", "c d", "e", "a b", "x y", "x y"]]
    assert scores["rouge_l"] == pytest.approx(1 / 3)
    assert scores["semantic"] == pytest.approx((1 + 1 / math.sqrt(2) + 0) / 3)  # -1 counts as 0
    assert text_fidelity(["a b"], ["a c"])["semantic"] is None
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        text_fidelity(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="embed returned 1 vectors for 2 texts"):
        text_fidelity(["a b"], ["a b"], embed=lambda texts: [[1.0]])


# --- models ------------------------------------------------------------------------------------


def test_identical_models_agree_fully(teacher, examples):
    twin = copy.deepcopy(teacher)
    scores = logit_fidelity(twin, teacher, batches(examples))
    assert scores["top1_agreement"] == 1.0
    assert scores["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert scores["tokens"] == sum(sum(x != IGNORE for x in e["labels"][1:]) for e in examples)


def test_logit_fidelity_equals_the_pure_metrics_and_ignores_padding(student, teacher, examples):
    pooled = logit_fidelity(student, teacher, batches(examples, size=5))
    one_by_one = logit_fidelity(student, teacher, batches(examples, size=1))
    assert 0 < pooled["top1_agreement"] < 1 and pooled["mean_kl"] > 0
    assert pooled["top1_agreement"] == one_by_one["top1_agreement"]
    assert pooled["mean_kl"] == pytest.approx(one_by_one["mean_kl"], rel=1e-5)
    [batch] = batches(examples, size=5)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = next_token_mask(batch["labels"])
    assert pooled["top1_agreement"] == top1_agreement(s, t, mask)
    assert pooled["mean_kl"] == pytest.approx(mean_kl(s, t, mask), rel=1e-5)


def test_teacher_text_perplexity_pools_tokens(student, examples):
    ppl = teacher_text_perplexity(student, batches(examples, size=5))
    total = count = 0.0
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        with torch.no_grad():
            logits = student(input_ids=ids).logits
        n = int(next_token_mask(labels).sum())
        total += math.log(perplexity(logits, labels)) * n
        count += n
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_vocab_mismatch_is_refused(teacher, examples):
    other = tiny_llama(layers=2, vocab=len(VOCAB) + 8)
    with pytest.raises(ValueError, match=f"one vocabulary: the student's has {len(VOCAB) + 8} "
                                         f"tokens, the teacher's {len(VOCAB)}"):
        logit_fidelity(other, teacher, batches(examples))


def test_wrappers_put_the_train_mode_back(student, teacher, examples):
    student.train()
    try:
        logit_fidelity(student, teacher, batches(examples))
        assert student.training and not teacher.training
    finally:
        student.eval()


def test_generation_fidelity_of_a_model_with_itself(teacher, tokenizer):
    references = greedy_answers(teacher, PROMPTS, tokenizer, max_new_tokens=8)
    assert all(len(r.split()) >= 4 for r in references)
    twin = copy.deepcopy(teacher)
    scores = generation_fidelity(twin, references, PROMPTS, tokenizer, max_new_tokens=8)
    assert scores == {"rouge_l": 1.0, "semantic": None}
    embedded = []

    def embed(texts):  # fixed vectors: the same text, the same vector
        embedded.extend(texts)
        return [[1.0, float(len(t))] for t in texts]

    scores = generation_fidelity(twin, references, PROMPTS, tokenizer, max_new_tokens=8,
                                 embed=embed)
    assert scores["semantic"] == pytest.approx(1.0)
    assert embedded == references * 2


def test_generation_fidelity_of_another_model(student, teacher, tokenizer):
    references = greedy_answers(teacher, PROMPTS, tokenizer, max_new_tokens=8)
    answers = greedy_answers(student, PROMPTS, tokenizer, max_new_tokens=8)
    assert answers != references

    def embed(texts):
        return [[1.0, 0.0] if t in references else [1.0, 1.0] for t in texts]

    scores = generation_fidelity(student, references, PROMPTS, tokenizer, max_new_tokens=8,
                                 embed=embed)
    rouge = [text_fidelity([a], [r])["rouge_l"] for a, r in zip(answers, references)]
    assert scores["rouge_l"] == pytest.approx(sum(rouge) / 3) and scores["rouge_l"] < 1
    cosines = [1.0 if a in references else 1 / math.sqrt(2) for a in answers]
    assert scores["semantic"] == pytest.approx(sum(cosines) / 3)
    with pytest.raises(ValueError, match="2 teacher answers for 3 prompts"):
        generation_fidelity(student, references[:2], PROMPTS, tokenizer, max_new_tokens=2)


def test_fidelity_report(student, teacher, tokenizer, examples):
    twin = copy.deepcopy(teacher)
    report = fidelity_report(twin, tokenizer, batches(examples), teacher=teacher,
                             prompts=PROMPTS, max_new_tokens=6)
    assert report["top1_agreement"] == 1.0 and report["mean_kl"] == pytest.approx(0, abs=1e-6)
    assert report["student_perplexity"] == pytest.approx(report["teacher_perplexity"])
    assert report["rouge_l"] == 1.0 and report["semantic"] is None and report["prompts"] == 3

    references = greedy_answers(teacher, PROMPTS, tokenizer, max_new_tokens=6)
    alone = fidelity_report(student, tokenizer, batches(examples), prompts=PROMPTS,
                            teacher_texts=references, max_new_tokens=6)
    assert alone["top1_agreement"] is None and alone["teacher_perplexity"] is None
    assert alone["student_perplexity"] == pytest.approx(
        teacher_text_perplexity(student, batches(examples)), rel=1e-6)
    assert alone["rouge_l"] < 1 and alone["tokens"] == report["tokens"]
    with pytest.raises(ValueError, match="teacher_texts"):
        fidelity_report(student, tokenizer, batches(examples), prompts=PROMPTS)
