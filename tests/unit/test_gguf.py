"""distill.gguf on tiny random llama / qwen2 models and a byte-level BPE ChatML tokenizer, all
built in code: nothing is downloaded. The GGUF files are loaded by llama.cpp and compared with
transformers."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distill.answers import answer_all
from distill.gguf import GGUF_TYPES, convert_to_gguf, permute_qk, pre_tokenizer_name
from tests.unit.test_student_init import CHATML

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
    "Numbers: 1, 22, 333 and 4444 apples.", "  Spaces   and\ttabs\nand new lines.",
    "Unicode: café, naïve, Ünïcödé, 日本語 and 🚀.", "def f(x):\n    return x ** 2  # square",
] * 10
TEXTS = [
    "Hello world!", "The year 2024 had 366 days.", "x  3 and  42   apples", "  leading\n\n\ttabs",
    "café 日本語 🚀 unseen words: zebra quixotic", "<|im_start|>user\nhi<|im_end|>\n",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # llama.cpp's name -> the HF pre-tokenizer it stands for
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "qwen2": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def bpe_tokenizer(pre: str = "gpt-2") -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained on CORPUS, with ChatML tokens; `pre` names the
    pre-tokenizer (GPT-2's by default)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast, **extra) -> torch.nn.Module:
    """2 layers, 64 wide, grouped-query attention; random biases (qwen2) and peaky logits."""
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    fields.update(extra)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**fields)) if arch == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**fields)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
        model.lm_head.weight.mul_(30)  # tied (qwen2 here): the embeddings too
    return model.eval()


def save(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ARCHS = {"llama": {}, "qwen2": {"tie_word_embeddings": True}}


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module", params=list(ARCHS))
def converted(request, tokenizer, tmp_path_factory):
    """(arch, HF model, {qtype: GGUF path}, progress lines) for every type."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = tiny_model(arch, tokenizer, **ARCHS[arch])
    folder = save(root / "hf", model, tokenizer)
    lines: list[str] = []
    files = {q: convert_to_gguf(folder, root / f"model.{q}.gguf", qtype=q, progress=lines.append)
             for q in GGUF_TYPES}
    return arch, model, files, lines


def ids_of(tokenizer):
    return tokenizer(" ".join(CORPUS[:6]), add_special_tokens=False)["input_ids"][:100]


def llama_logits(path, ids) -> np.ndarray:
    """llama.cpp's logits at every position, with an F32 KV cache (no rounding there)."""
    llm = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=128, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_logits_match_transformers(converted, tokenizer):
    _arch, model, files, _ = converted
    ids = ids_of(tokenizer)
    ref = hf_logits(model, ids)
    scale = np.abs(ref).max()
    assert scale > 5  # peaky enough for the bounds below to mean something
    f32 = llama_logits(files["F32"], ids)
    assert np.abs(f32 - ref).max() < 1e-4 * scale  # measured ~3e-7 * scale
    f16 = llama_logits(files["F16"], ids)
    assert np.abs(f16 - ref).max() < 5e-3 * scale  # measured ~4e-4 * scale
    q8 = llama_logits(files["Q8_0"], ids)
    assert np.abs(q8 - ref).max() < 0.05 * scale  # measured ~0.01 * scale
    assert (q8.argmax(1) == ref.argmax(1)).mean() > 0.9
    for q in ("Q4_0", "Q4_K_M"):  # these load and run too; too coarse to bound tightly here
        assert (llama_logits(files[q], ids).argmax(1) == ref.argmax(1)).mean() > 0.7


@pytest.mark.parametrize(("arch", "rope"), [
    ("llama", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    ("llama", {"rope_type": "linear", "factor": 2.0}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
], ids=["llama3", "linear", "yarn"])
def test_rope_scaling_is_carried(arch, rope, tokenizer, tmp_path):
    model = tiny_model(arch, tokenizer, rope_scaling=rope)
    out = convert_to_gguf(save(tmp_path / "hf", model, tokenizer), tmp_path / "m.gguf",
                          qtype="F32")
    ids = ids_of(tokenizer)  # 100 positions: well past the 16/32 of the original context
    ref = hf_logits(model, ids)
    assert np.abs(llama_logits(out, ids) - ref).max() < 1e-4 * np.abs(ref).max()


def test_metadata_and_tokenization_match_the_hf_tokenizer(converted, tokenizer):
    arch, model, files, _ = converted
    reader = gguf.GGUFReader(files["F32"])
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                         "tokenizer.ggml.token_type")}
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.embedding_length"] == 64
    assert meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == CHATML
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert [types[tokenizer.convert_tokens_to_ids(t)] for t in SPECIALS] == [3, 3, 3]  # CONTROL

    llm = llama_cpp.Llama(str(files["Q8_0"]), vocab_only=True, verbose=False)
    try:
        for text in [*TEXTS, tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hello, 42 foxes?"}], tokenize=False,
                add_generation_prompt=True)]:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
            assert llm.detokenize(expected, special=True).decode() == tokenizer.decode(expected)
    finally:
        llm.close()


@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_each_pre_tokenizer_splits_text_like_hf(pre, tmp_path):
    tokenizer = bpe_tokenizer(pre)
    folder = save(tmp_path / "hf", tiny_model("qwen2", tokenizer), tokenizer)
    out = convert_to_gguf(folder, tmp_path / "m.gguf", qtype="F16")
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == pre
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
    finally:
        llm.close()


def test_quantized_files_are_smaller_and_k_quant_fallback_is_reported(converted):
    _, _, files, lines = converted
    size = {q: p.stat().st_size for q, p in files.items()}
    assert size["Q4_0"] < size["Q8_0"] < size["F16"] < size["F32"]
    assert size["Q4_K_M"] < size["F16"]
    kinds = {q: {t.tensor_type.name for t in gguf.GGUFReader(p).tensors} for q, p in files.items()}
    assert kinds["F32"] == {"F32"} and kinds["F16"] == {"F16", "F32"}
    assert "Q8_0" in kinds["Q8_0"] and "Q4_0" in kinds["Q4_0"]
    # 64-wide rows are not a multiple of 256: llama.cpp falls back from Q4_K/Q6_K per tensor
    assert "Q4_K" not in kinds["Q4_K_M"] and "Q5_0" in kinds["Q4_K_M"]
    assert any("required fallback quantization" in line for line in lines)
    assert any(line.startswith("quantizing to Q4_K_M") for line in lines)
    assert not [p for p in files["F32"].parent.iterdir() if p.name.startswith(".")]  # temps gone


def test_the_gguf_serves_through_the_llamacpp_engine(converted, tokenizer):
    _arch, model, files, _ = converted
    answer = answer_all(str(files["F32"]), ["the quick brown fox"], max_tokens=4, n_ctx=128)[0]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the quick brown fox"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert answer.prompt_tokens == ids.shape[1]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    assert answer.text == tokenizer.decode(out, skip_special_tokens=True)


def test_permute_qk_interleaves_each_heads_halves():
    rows = torch.arange(16).reshape(16, 1)  # 2 heads of 8: x0..x3 y0..y3 per head
    assert permute_qk(rows, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7,
                                                      8, 12, 9, 13, 10, 14, 11, 15]
    assert permute_qk(torch.arange(8), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # a bias


@pytest.mark.parametrize(("pre", "name"), [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}, "qwen2"),
])
def test_pre_tokenizer_name(pre, name):
    assert pre_tokenizer_name({"model": {"type": "BPE"}, "pre_tokenizer": pre}) == name


@pytest.mark.parametrize(("spec", "message"), [
    ({"model": {"type": "WordLevel"}, "pre_tokenizer": {"type": "WhitespaceSplit"}},
     "only byte-level BPE tokenizers"),
    ({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"}},
     "only byte-level BPE tokenizers"),
    ({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "x"}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}}, "llama.cpp has no pre-tokenizer"),
    ({"model": {"type": "BPE"}, "normalizer": {"type": "Lowercase"},
      "pre_tokenizer": {"type": "ByteLevel"}}, "normalizer 'Lowercase'"),
])
def test_unsupported_tokenizers_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        pre_tokenizer_name(spec)


def test_errors(converted, tokenizer, tmp_path):
    _, _, files, _ = converted
    folder = files["F32"].parent / "hf"
    with pytest.raises(ValueError, match="qtype must be one of F32, F16, Q8_0, Q4_0, Q4_K_M"):
        convert_to_gguf(folder, tmp_path / "x.gguf", qtype="Q5_K")
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        convert_to_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")
    with pytest.raises(FileExistsError, match="exists"):
        convert_to_gguf(folder, files["F32"])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                      n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'.*supported architectures are llama, qwen2"):
        convert_to_gguf(save(tmp_path / "gpt2", gpt2, tokenizer), tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_a_word_level_tokenizer_is_refused_and_nothing_is_left(tmp_path):
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   eos_token="<|im_end|>")
    folder = save(tmp_path / "hf", tiny_model("llama", fast), fast)
    with pytest.raises(ValueError, match="only byte-level BPE tokenizers"):
        convert_to_gguf(folder, tmp_path / "out" / "m.gguf", qtype="Q8_0")
    assert not [p for p in (tmp_path / "out").iterdir()]
