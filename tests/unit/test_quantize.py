"""distill.quantize and `protege quantize` on a tiny random Llama (2 layers, 64 wide, tied
embeddings like SmolLM2) and a byte-level BPE ChatML tokenizer, all built in code."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from distill.answers import Answer, answer_all, open_engine
from distill.quantize import QUANT_FORMATS, REPORT_FILE, held_out, quantize
from ops.cli import app
from serving.engines.int8 import INT8_METHOD, Int8Linear, load_int8

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
          "Numbers: 1, 22, 333 and 4444 apples.", "def f(x):\n    return x ** 2"] * 10
PROMPTS = ["Hello world!", "The quick brown fox", "Numbers and apples", "How are you today?"]
TEACHER = ["Hello there!", "jumps over the lazy dog", "1, 22, 333", "fine, thank you"]
LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "mlp": ("gate_proj", "up_proj", "down_proj")}


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, fp32 model) of a tiny tied-embedding Llama with peaky logits."""
    tokenizer = bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # the embeddings too (tied): greedy answers are not noise
    folder = tmp_path_factory.mktemp("src") / "student"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def int8(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    return out, quantize(source[0], "int8", out, prompts=PROMPTS, teacher_answers=TEACHER,
                         max_new_tokens=6)


def token_ids(n=40, seed=1):
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def quantized_names():
    return [f"model.layers.{i}.{block}.{name}" for i in range(2)
            for block, names in LINEARS.items() for name in names]


def test_int8_keeps_int8_weights_and_its_logits_stay_close_to_fp32(source, int8):
    fp32 = source[1]
    out, _ = int8
    model = load_int8(out)
    names = quantized_names()
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, Int8Linear) and layer.qweight.dtype == torch.int8
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, still fp32
    assert model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, fp32.lm_head.weight)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == INT8_METHOD and sorted(config["modules"]) == sorted(names)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(f"{names[0]}.qweight").dtype == torch.int8
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in names for k in keys)
    assert "lm_head.weight" not in keys  # tied: written once

    ids = token_ids()
    with torch.no_grad():
        got, want = model(ids).logits, fp32(ids).logits
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_int8_folder_runs_in_the_transformers_engine(int8):
    out, _ = int8

    async def layer_type():
        async with open_engine(str(out)) as engine:
            return type(engine.model.get_submodule("model.layers.0.mlp.up_proj"))

    assert asyncio.run(layer_type()) is Int8Linear
    answers = answer_all(str(out), PROMPTS[:2], max_tokens=5)
    assert all(a.completion_tokens > 0 and a.text for a in answers)


def test_report_has_files_sizes_bits_per_weight_and_fidelity(source, int8):
    folder, fp32 = source
    out, report = int8
    assert json.loads((out / REPORT_FILE).read_text()) == report
    assert report["format"] == "int8" and report["engine"] == "transformers"
    assert report["source"] == str(folder) and report["output"] == str(out)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(report["files"])
    for name, digest in report["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    params = sum(p.numel() for p in fp32.parameters())  # tied embeddings counted once
    assert report["parameters"] == params
    assert report["size_bytes"]["before"] == (folder / "model.safetensors").stat().st_size
    assert report["size_bytes"]["after"] == (out / "model.safetensors").stat().st_size
    assert report["size_bytes"]["after"] < 0.5 * report["size_bytes"]["before"]
    layers = [fp32.get_submodule(n) for n in quantized_names()]
    ints = sum(m.weight.numel() for m in layers)
    scales = sum(m.out_features for m in layers)  # one bfloat16 scale per output channel
    bits = report["bits_per_weight"]
    assert bits["before"] == 32.0
    assert bits["after"] == pytest.approx((8 * ints + 16 * scales + 32 * (params - ints)) / params)

    fidelity = report["fidelity"]
    assert fidelity["prompts"] == len(PROMPTS) and fidelity["engine"] == "transformers"
    assert 0 <= fidelity["vs_unquantized"]["rouge_l"] <= 1
    teacher = fidelity["vs_teacher"]
    for key in ("rouge_l", "exact_match"):
        assert teacher["delta"][key] == pytest.approx(
            teacher["quantized"][key] - teacher["unquantized"][key])
    for side in ("unquantized", "quantized"):
        assert fidelity["speed"][side]["completion_tokens"] > 0
        assert fidelity["speed"][side]["tokens_per_s"] > 0


def test_fidelity_scores_answers_against_each_other_and_the_teacher(source, tmp_path,
                                                                   monkeypatch):
    canned = {"student": ["a b c", "x"], "w8a16": ["a b d", "x"]}

    def fake_answer_all(model, prompts, *, max_tokens):
        return [Answer(text, (), 1, 3, "stop", 0.1, 0.5) for text in canned[Path(model).name]]

    monkeypatch.setattr("distill.quantize.answer_all", fake_answer_all)
    report = quantize(source[0], "w8a16", tmp_path / "w8a16", prompts=["p", "q"],
                      teacher_answers=["a b c", "y"])
    fidelity = report["fidelity"]
    assert fidelity["vs_unquantized"] == pytest.approx({"rouge_l": (2 / 3 + 1) / 2,
                                                        "exact_match": 0.5})
    assert fidelity["vs_teacher"]["unquantized"] == pytest.approx({"rouge_l": 0.5,
                                                                   "exact_match": 0.5})
    assert fidelity["vs_teacher"]["quantized"] == pytest.approx({"rouge_l": 1 / 3,
                                                                 "exact_match": 0.0})
    assert fidelity["vs_teacher"]["delta"] == pytest.approx({"rouge_l": -1 / 6,
                                                             "exact_match": -0.5})
    assert fidelity["speed"]["quantized"]["tokens_per_s"] == pytest.approx(6.0)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("fmt", ["w8a16", "w4a16"])
def test_compressed_tensors_folder_decompresses_close_to_the_original(source, tmp_path, fmt):
    folder, fp32 = source
    bits = QUANT_FORMATS[fmt].bits
    report = quantize(folder, fmt, tmp_path / fmt)
    config = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized" and config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"]
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "dynamic",
                                             "strategy", "group_size")} == {
        "num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
        "strategy": "group", "group_size": 64}
    assert report["scheme"]["granularity"] == "group of 64"
    params, layers = report["parameters"], [fp32.get_submodule(n) for n in quantized_names()]
    ints = sum(m.weight.numel() for m in layers)
    scales = ints // 64  # one bfloat16 scale per group
    shapes = 2 * len(layers)  # an int64 (out, in) per layer
    assert report["bits_per_weight"]["after"] == pytest.approx(
        (bits * ints + 16 * scales + 64 * shapes + 16 * (params - ints)) / params)
    with safe_open(tmp_path / fmt / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed").dtype == torch.int32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16

    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / fmt, dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    levels = (2**bits - 1) / 2  # symmetric: max |w| of a group maps to ±levels
    for name in quantized_names():
        want = fp32.get_submodule(name).weight.detach()
        got = model.get_submodule(name).weight.detach()
        step = want.reshape(want.shape[0], -1, 64).abs().amax(-1, keepdim=True) / levels
        error = (got - want).reshape(want.shape[0], -1, 64).abs()
        # half a step (a bit more at the clip), plus the bfloat16 the weights decompress to
        bound = 0.8 * step + want.reshape(error.shape).abs() * 2**-8
        assert (error <= bound).all(), name
        assert error.max() > 0
    ids = token_ids()
    with torch.no_grad():
        got, want = model(ids).logits, fp32(ids).logits
    assert (got - want).abs().max() < (0.03 if bits == 8 else 0.3) * want.abs().max()


def test_gguf_report_reads_bits_per_weight_from_the_file(source, tmp_path):
    report = quantize(source[0], "gguf-q8_0", tmp_path / "q8", prompts=PROMPTS[:2],
                      teacher_answers=TEACHER[:2], max_new_tokens=4)
    assert report["output"] == str(tmp_path / "q8" / "student.Q8_0.gguf")
    assert list(report["files"]) == ["student.Q8_0.gguf"]
    assert report["scheme"]["tensor_types"]["Q8_0"] > 0
    assert 8.5 <= report["bits_per_weight"]["after"] < 9.5  # Q8_0: 34 bytes per 32 weights
    assert report["fidelity"]["engine"] == "llamacpp"
    assert report["fidelity"]["reference"] == "F32 GGUF of the source"
    assert report["fidelity"]["speed"]["quantized"]["completion_tokens"] > 0


def test_held_out_reads_teacher_answers_from_a_chat_export_or_prompts_alone(tmp_path):
    chats = tmp_path / "validation.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p}, {"role": "assistant", "content": t}]}) + "\n"
        for p, t in zip(PROMPTS, TEACHER)))
    prompts, teacher = held_out(chats)
    assert prompts[0] == [{"role": "user", "content": PROMPTS[0]}] and teacher == TEACHER
    plain = tmp_path / "prompts.txt"
    plain.write_text("\n".join(PROMPTS))
    assert held_out(plain) == ([[{"role": "user", "content": p}] for p in PROMPTS], None)


def test_quantize_refuses_bad_input_before_writing(source, tmp_path):
    with pytest.raises(ValueError, match="unknown format 'q3'"):
        quantize(source[0], "q3", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        quantize(tmp_path / "missing", "int8", tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        quantize(source[0], "int8", tmp_path / "full")
    with pytest.raises(ValueError, match="1 teacher answers for 2 prompts"):
        quantize(source[0], "int8", tmp_path / "c", prompts=["a", "b"], teacher_answers=["a"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_prints_the_table_and_the_report_path(source, tmp_path):
    chats = tmp_path / "validation.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p}, {"role": "assistant", "content": t}]}) + "\n"
        for p, t in zip(PROMPTS[:2], TEACHER[:2])))
    out = tmp_path / "w4"
    result = CliRunner().invoke(app, ["quantize", str(source[0]), "--to", "w4a16", "--out",
                                      str(out), "--prompts", str(chats),
                                      "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"w4a16: {out} (served by vllm)"
    assert any(line.startswith("bits/weight") for line in lines)
    assert any(line.startswith("vs teacher rouge_l") for line in lines)
    assert lines[-1] == f"report: {out / REPORT_FILE}"
    assert json.loads((out / REPORT_FILE).read_text())["fidelity"]["prompts"] == 2


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}", "--to", "int8"], "no such folder"),
    (["{src}", "--to", "q3"], "unknown format 'q3' (allowed: gguf-q8_0, "),
    (["{src}", "--to", "int8", "--out", "{full}"], "not an empty folder"),
    (["{src}", "--to", "int8", "--prompts", "{missing}.jsonl"], "--prompts"),
])
def test_cli_bad_input_is_one_line_and_exit_2(source, tmp_path, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    paths = {"src": source[0], "missing": tmp_path / "missing", "full": tmp_path / "full"}
    result = CliRunner().invoke(app, ["quantize", *(a.format(**paths) for a in args)])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_cli_help_names_every_format():
    result = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "300"})
    assert all(fmt in result.stdout for fmt in QUANT_FORMATS)
