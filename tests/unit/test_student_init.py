"""distill.student on tiny random Llama / Qwen2 models and a word-level ChatML tokenizer, all
built in code: nothing is downloaded."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertLMHeadModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distill.student import INIT_FILE, init_student, kept_layers, load_teacher

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "system", "user", "assistant", "hello", "world", "the", "a", "quick", "brown", "fox", "jumps",
    "over", "lazy", "dog", "red", "green", "blue", "one", "two", "three", "four", "five", "six",
    "seven", "eight", "nine", "ten", "alpha", "beta", "gamma", "delta", "sun", "moon", "star",
    "river", "stone", "tree", "leaf", "wind", "rain", "snow", "fire", "water", "earth", "sky",
    "cloud", "light", "dark",
]
VOCAB = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *WORDS])}
EOS = VOCAB["<|im_end|>"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def tiny_llama(layers: int = 2, seed: int = 0, vocab: int = len(VOCAB)) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=None, eos_token_id=EOS,
                         pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaky distributions: greedy answers are not noise
    model.generation_config.eos_token_id = EOS
    return model.eval()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tiny_llama(layers=6).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(teacher_dir)[0]


def layer_state(model, i):
    prefix = f"model.layers.{i}."
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def greedy(model, tokenizer, n=6):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the quick brown fox"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_keep_layers_copies_weights_and_the_folder_loads_and_generates(teacher_dir, teacher,
                                                                        tmp_path):
    out = init_student(teacher_dir, tmp_path / "student", keep_layers=[0, 2, 4])
    student = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert student.config.num_hidden_layers == 3
    assert len(student.model.layers) == 3
    for j, i in enumerate([0, 2, 4]):
        s, t = layer_state(student, j), layer_state(teacher, i)
        assert s.keys() == t.keys()
        assert all(torch.equal(s[k], t[k]) for k in s)
        assert student.model.layers[j].self_attn.layer_idx == j  # KV cache slots renumbered
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    assert not torch.equal(layer_state(student, 1)["mlp.up_proj.weight"],
                           layer_state(teacher, 1)["mlp.up_proj.weight"])

    record = json.loads((out / INIT_FILE).read_text())
    assert record["teacher"] == str(teacher_dir)
    assert record["kept_layers"] == [0, 2, 4] and record["teacher_layers"] == 6
    assert record["student_layers"] == 3
    assert record["student_parameters"] < record["teacher_parameters"]
    assert (out / "tokenizer.json").read_bytes() == (teacher_dir / "tokenizer.json").read_bytes()
    assert list(out.glob("*.safetensors"))

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.chat_template == CHATML
    tokens = greedy(student, tokenizer)
    assert len(tokens) == 6 and all(0 <= t < len(VOCAB) for t in tokens)


def test_every_layer_kept_gives_the_teacher_back(teacher_dir, teacher, tmp_path):
    out = init_student(teacher_dir, tmp_path / "all", every=1)
    student = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert greedy(student, tokenizer) == greedy(teacher, tokenizer)


def test_every_two_from_a_loaded_model_with_a_tokenizer(teacher, tmp_path):
    tokenizer = word_tokenizer()
    out = init_student(teacher, tmp_path / "s", every=2, tokenizer=tokenizer)
    record = json.loads((out / INIT_FILE).read_text())
    assert record["kept_layers"] == [0, 2, 4] and record["student_layers"] == 3
    student = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(layer_state(student, 2)["self_attn.q_proj.weight"],
                       layer_state(teacher, 4)["self_attn.q_proj.weight"])
    assert AutoTokenizer.from_pretrained(out).encode("hello world") == tokenizer.encode(
        "hello world")


def test_kept_layers():
    assert kept_layers(10, every=3) == [0, 3, 6, 9]
    assert kept_layers(6, every=2) == [0, 2, 4]
    assert kept_layers(6, every=6) == [0]
    assert kept_layers(6, keep_layers=[1, 5]) == [1, 5]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep_layers": [0, 6]}, "teacher has 6 layers: indices must be integers from 0 to 5"),
    ({"keep_layers": [-1]}, "teacher has 6 layers"),
    ({"keep_layers": [2, 1]}, "strictly increasing"),
    ({"keep_layers": [1, 1]}, "strictly increasing"),
    ({"keep_layers": []}, "at least one layer"),
    ({"every": 0}, "every must be an integer >= 1"),
    ({}, "exactly one of keep_layers"),
    ({"keep_layers": [0], "every": 2}, "exactly one of keep_layers"),
])
def test_bad_layer_choices_are_refused(teacher, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        init_student(teacher, tmp_path / "s", tokenizer=word_tokenizer(), **kwargs)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("build", [
    lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2,
                                       n_positions=32, bos_token_id=0, eos_token_id=0)),
    lambda: BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64,
                                       is_decoder=True)),
], ids=["gpt2", "bert"])
def test_unsupported_architecture(build, tmp_path):
    model = build()
    with pytest.raises(ValueError, match=r"decoder-only HF models whose layers are "
                                         r"`model.model.layers`.*is not one"):
        init_student(model, tmp_path / "s", every=2, tokenizer=word_tokenizer())


def test_non_empty_out_dir_and_missing_tokenizer_are_refused(teacher, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        init_student(teacher, tmp_path / "busy", every=2, tokenizer=word_tokenizer())
    bare = tiny_llama(layers=2)  # built in memory: no folder to copy a tokenizer from
    with pytest.raises(ValueError, match="pass tokenizer="):
        init_student(bare, tmp_path / "s", every=2)


def test_qwen2_sliding_window_layer_types_are_cut(tmp_path):
    config = Qwen2Config(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, use_sliding_window=True, sliding_window=4,
                         max_window_layers=3, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(1)
    qwen = Qwen2ForCausalLM(config).eval()
    assert qwen.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    out = init_student(qwen, tmp_path / "q", keep_layers=[0, 2, 3, 5], tokenizer=word_tokenizer())
    student = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert isinstance(student, Qwen2ForCausalLM)
    assert student.config.layer_types == ["full_attention", "full_attention",
                                          "sliding_attention", "sliding_attention"]
    assert student.config.max_window_layers == 2
    assert student.config.sliding_window == 4
    assert torch.equal(layer_state(student, 3)["self_attn.k_proj.bias"],
                       layer_state(qwen, 5)["self_attn.k_proj.bias"])
    assert len(greedy(student, word_tokenizer(), n=10)) == 10  # past the window


def test_load_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_teacher(tmp_path)
    with pytest.raises(FileNotFoundError, match="no GGUF file 'x.gguf'"):
        load_teacher(tmp_path / "x.gguf")


def test_a_model_loaded_from_a_folder_brings_its_tokenizer_files(teacher_dir, teacher, tmp_path):
    out = init_student(teacher, tmp_path / "s", keep_layers=[5])
    assert (out / "tokenizer.json").read_bytes() == (teacher_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / INIT_FILE).read_text())["teacher"] == str(teacher_dir)


def test_cli_init_student(teacher_dir, tmp_path):
    from typer.testing import CliRunner

    from ops.cli import app

    runner = CliRunner()
    out = tmp_path / "cli-student"
    result = runner.invoke(app, ["distill", "init-student", "--from", str(teacher_dir),
                                 "--out", str(out), "--keep-layers", "0,2"])
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    bad = runner.invoke(app, ["distill", "init-student", "--from", str(teacher_dir),
                              "--out", str(tmp_path / "bad"), "--keep-layers", "0,99"])
    assert bad.exit_code == 2 and "99" in bad.output
    bad = runner.invoke(app, ["distill", "init-student", "--from", str(teacher_dir),
                              "--out", str(tmp_path / "bad2"), "--keep-layers", "a,b"])
    assert bad.exit_code == 2
