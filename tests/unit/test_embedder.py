"""SemanticEmbedder on a tiny random BERT and a WordPiece vocabulary built in code."""

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from shadow.embedder import SemanticEmbedder
from shadow.scoring import cosine, score_pair

# fmt: off
WORDS = ["the", "a", "cat", "dog", "sits", "sat", "on", "mat", "is", "sitting", "quarterly",
         "revenue", "grew", "by", "red", "blue", "one", "two", "three", "four", "five", "six",
         "seven", "eight", "nine", "ten"]
# fmt: on
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_SEQ = 16  # word pieces per text, [CLS] and [SEP] included
TEXTS = [
    "The cat sits on the mat",
    "a dog",
    "",
    "quarterly revenue grew by five",
    "one two three four five six seven eight nine ten",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A sentence-transformers folder: a 2-layer, 32-wide BERT with mean pooling."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = {piece: i for i, piece in enumerate([*SPECIAL, *WORDS, "##s", "##ing"])}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)  # WordPiece, like BERT's
    assert tokenizer.unk_token_id not in tokenizer(" ".join(WORDS).upper())["input_ids"]
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    (path / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": folder, "type": f"sentence_transformers.models.{kind}"}
        for i, (folder, kind) in enumerate(modules)
    ]))  # fmt: skip
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
    }))  # fmt: skip
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ}))
    return path


@pytest.fixture(scope="module")
def embedder(model_dir):
    return SemanticEmbedder(model_dir, batch_size=2)


def test_one_unit_vector_per_text(embedder):
    vectors = embedder(TEXTS)
    assert len(vectors) == len(TEXTS)
    assert embedder.dimension == 32 and embedder.max_length == MAX_SEQ
    for vector in vectors:
        assert len(vector) == 32 and all(isinstance(x, float) for x in vector)
        assert sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-5)
    assert embedder([]) == []
    with pytest.raises(TypeError, match=r"wrap one text as \[text\]"):
        embedder("one text")


def test_identical_texts_have_cosine_one(embedder):
    cat, same, other = embedder(["The cat sits", "The cat sits", "quarterly revenue grew"])
    assert cosine(cat, same) == pytest.approx(1.0, abs=1e-6)
    assert cosine(cat, other) < 0.999


def test_batches_give_what_one_by_one_gives(embedder):
    batched = embedder(TEXTS)  # batch_size 2: padded batches, sorted by length
    for text, vector in zip(TEXTS, batched, strict=True):
        assert vector == pytest.approx(embedder([text])[0], abs=1e-5)


def test_mean_of_token_states_then_l2(embedder, model_dir):
    encoded = embedder.tokenizer(["the cat sat on a mat"], return_tensors="pt")
    with torch.inference_mode():
        hidden = BertModel.from_pretrained(model_dir)(**encoded).last_hidden_state[0]
    expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
    assert embedder(["the cat sat on a mat"])[0] == pytest.approx(expected.tolist(), abs=1e-5)


def test_long_texts_are_truncated_to_max_seq_length(embedder):
    long = " ".join(WORDS * 5)
    kept = " ".join(WORDS[: MAX_SEQ - 2])  # one piece per word, plus [CLS] and [SEP]
    assert embedder([long])[0] == pytest.approx(embedder([kept])[0], abs=1e-5)


def test_plain_transformers_folder_defaults(model_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    for extra in ("modules.json", "sentence_bert_config.json"):
        (plain / extra).unlink()
    shutil.rmtree(plain / "1_Pooling")
    embedder = SemanticEmbedder(plain, threads=torch.get_num_threads())
    assert embedder.max_length == 64  # max_position_embeddings
    assert embedder(["a cat"])[0] == pytest.approx(
        SemanticEmbedder(model_dir)(["a cat"])[0], abs=1e-6
    )


def test_works_as_score_pair_embed(embedder):
    scores = score_pair("The cat sits on the mat", "The cat sits on the mat", embed=embedder)
    assert scores["semantic"] == pytest.approx(1.0, abs=1e-6)
    assert scores["disagreement"] == pytest.approx(0.0, abs=1e-6)
    assert score_pair("a red cat", "revenue grew", embed=embedder)["semantic"] < 0.999


def test_missing_model_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `make models`"):
        SemanticEmbedder(tmp_path / "nowhere")


def test_refuses_other_pooling(model_dir, tmp_path):
    cls_pooled = tmp_path / "cls"
    shutil.copytree(model_dir, cls_pooled)
    (cls_pooled / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    with pytest.raises(ValueError, match="mean pooling only.*pooling_mode_cls_token"):
        SemanticEmbedder(cls_pooled)


def test_rejects_a_bad_batch_size(model_dir):
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        SemanticEmbedder(model_dir, batch_size=0)
