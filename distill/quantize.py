"""Quantization: a distilled Hugging Face model folder -> a smaller artifact that an engine serves,
and a report of what it cost.

Owns the formats (`QUANT_FORMATS`), writing each artifact (the int8 layer it writes is the
`transformers` engine's, `serving.engines.int8`) and the report `quantize.json`: sizes,
bits per weight and, given held-out prompts, how far the quantized model's greedy answers move
from its unquantized self and from the teacher's answers. Does not own writing GGUF
(`distill.gguf`), running models (`distill.answers`, through the serving engines), text scores
(`shadow.scoring`) or pass/fail thresholds (the gate).

| format        | artifact                                        | served by                          |
|---------------|-------------------------------------------------|------------------------------------|
| `gguf-q8_0`   | one GGUF file, Q8_0                             | `llamacpp`                         |
| `gguf-q4_k_m` | one GGUF file, Q4_K_M                           | `llamacpp`                         |
| `gguf-q4_0`   | one GGUF file, Q4_0                             | `llamacpp`                         |
| `int8`        | HF folder: int8 weights, a scale per out channel | `transformers` on CPU              |
| `w8a16`       | HF folder, compressed-tensors `pack-quantized`  | `vllm` (GPU kernels)               |
| `w4a16`       | the same at 4 bits                              | `vllm` (GPU kernels)               |

What is quantized: every `nn.Linear` but the output head; embeddings, norms and `lm_head` keep
their precision, tied embeddings stay tied. All schemes are symmetric round-to-nearest on the
weights alone (no calibration data, no GPTQ/AWQ).
- `int8`: one scale per output channel; the matmul is torch's fused CPU kernel
  `_weight_int8pack_mm` with bfloat16 activations (its fast path), so the weights stay int8 in
  memory. The folder is marked by `quantization_config.quant_method = "protege-int8"`.
- `w8a16` / `w4a16`: one scale per group of G input columns, G the largest of 128, 64, 32 that
  divides every quantized layer's width (per output channel when none does); tensors left
  unquantized are written in bfloat16, the activation type vLLM runs these kernels with.

Fidelity compares each model on the engine that serves its artifact, so the delta is the
quantization's alone: `int8`, `w8a16`, `w4a16` against the source folder on `transformers`
(`w8a16`/`w4a16` are decompressed to dense weights there: accuracy, not vLLM's speed), GGUF
against an F32 GGUF of the source on `llamacpp`. (Over 400 lines: one writer per format and
the one report they share.)
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.hashing import sha256_file
from distill.answers import answer_all
from distill.data import load_chat_examples, load_prompts
from distill.fidelity import text_fidelity
from distill.gguf import convert_to_gguf
from serving.engines.int8 import INT8_METHOD, Int8Linear, set_submodule, tied_aliases
from shadow.scoring import exact_match

Prompt = str | Sequence[dict[str, str]]  # a user message, or chat messages ending before the answer
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class QuantFormat:
    kind: str  # "gguf" | "int8" | "compressed-tensors"
    bits: int  # nominal bits of a quantized weight
    engine: str  # the engine that serves the artifact
    gguf_type: str | None = None  # distill.gguf.GGUF_TYPES entry, for kind "gguf"


QUANT_FORMATS: dict[str, QuantFormat] = {
    "gguf-q8_0": QuantFormat("gguf", 8, "llamacpp", "Q8_0"),
    "gguf-q4_k_m": QuantFormat("gguf", 4, "llamacpp", "Q4_K_M"),
    "gguf-q4_0": QuantFormat("gguf", 4, "llamacpp", "Q4_0"),
    "int8": QuantFormat("int8", 8, "transformers"),
    "w8a16": QuantFormat("compressed-tensors", 8, "vllm"),
    "w4a16": QuantFormat("compressed-tensors", 4, "vllm"),
}
REPORT_FILE = "quantize.json"
GROUP_SIZES = (128, 64, 32)  # w8a16/w4a16 group sizes tried, largest first
_WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SKIPPED_FILES = {REPORT_FILE, "model.safetensors.index.json", "pytorch_model.bin.index.json"}


# --- the report ------------------------------------------------------------------------------


def quantize(model_dir: str | Path, fmt: str, out_dir: str | Path, *,
             prompts: Sequence[Prompt] | None = None,
             teacher_answers: Sequence[str] | None = None, max_new_tokens: int = 48,
             progress: Progress | None = None) -> dict[str, Any]:
    """Write `model_dir` (an HF folder with safetensors weights) quantized to `fmt` into
    `out_dir` (new or empty), with `out_dir/quantize.json`; return that report.

    Given `prompts`, the report has `fidelity`: greedy answers of the quantized and unquantized
    models compared with each other and, given `teacher_answers` (one per prompt), with those.
    Bad input raises ValueError / FileNotFoundError / FileExistsError before anything is written;
    on a failure later, an `out_dir` this call created is removed.
    """
    say = progress or (lambda _message: None)
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown format {fmt!r} (allowed: {', '.join(QUANT_FORMATS)})")
    spec = QUANT_FORMATS[fmt]
    source = Path(model_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    _check_source(source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: give a new --out")
    if teacher_answers is not None and (prompts is None or len(teacher_answers) != len(prompts)):
        raise ValueError(f"{len(teacher_answers)} teacher answers for "
                         f"{0 if prompts is None else len(prompts)} prompts")
    if prompts is not None and not prompts:
        raise ValueError("no prompts: give at least one, or none for a report without fidelity")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if spec.kind == "compressed-tensors" and importlib.util.find_spec("compressed_tensors") is None:
        raise ImportError(f"{fmt} needs the compressed-tensors package: "
                          "pip install 'protege[quantize]'")

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        say(f"quantizing {source} to {fmt}")
        if spec.kind == "gguf":
            artifact, scheme = _write_gguf(source, out, spec, say)
        elif spec.kind == "int8":
            artifact, scheme = out, _write_int8(source, out)
        else:
            artifact, scheme = out, _write_compressed(source, out, spec.bits)
        seconds = time.perf_counter() - started
        before, after = _weight_stats(source), _weight_stats(artifact)
        params = before["elements"]
        # a GGUF tensor knows its logical size; packed safetensors do not: count the source's
        weights_after = after["elements"] if spec.kind == "gguf" else params
        report: dict[str, Any] = {
            "format": fmt,
            "engine": spec.engine,
            "source": str(source),
            "output": str(artifact),
            "report": str(out / REPORT_FILE),
            "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in _files(out)},
            "source_files": {p.name: sha256_file(p) for p in _weight_files(source)},
            "parameters": params,
            "size_bytes": {"before": before["file_bytes"], "after": after["file_bytes"],
                           "ratio": after["file_bytes"] / before["file_bytes"]},
            "bits_per_weight": {"before": 8 * before["tensor_bytes"] / params,
                                "after": 8 * after["tensor_bytes"] / weights_after},
            "scheme": scheme,
            "quantize_s": round(seconds, 3),
            "fidelity": None,
        }
        if prompts is not None:
            with tempfile.TemporaryDirectory(prefix="protege-quantize-") as tmp:
                reference = _reference(source, spec, Path(tmp), say)
                report["fidelity"] = _fidelity(reference, artifact, spec, prompts,
                                               teacher_answers, max_new_tokens, say)
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    say(f"report written to {out / REPORT_FILE}")
    return report


def held_out(path: str | Path) -> tuple[list[list[dict[str, str]]], list[str] | None]:
    """(prompts, teacher answers) from a chat export (`protege dataset export`'s
    validation.jsonl: each chat ends with the teacher's answer), or (prompts, None) from a
    prompt file (`distill.data.load_prompts`: .txt or .jsonl)."""
    path = Path(path)
    if path.suffix != ".parquet" and not _answered(path):
        return load_prompts(path), None
    examples = load_chat_examples(path)
    return ([e["messages"][:-1] for e in examples],
            [e["messages"][-1]["content"] for e in examples])


def _answered(path: Path) -> bool:
    """Whether the first row of a .jsonl file is a chat ending with the assistant's answer."""
    if path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return json.loads(first)["messages"][-1]["role"] == "assistant"
    except (ValueError, LookupError, TypeError):  # not JSON, no messages: not a chat export
        return False


# --- writers ---------------------------------------------------------------------------------


def _write_gguf(source: Path, out: Path, spec: QuantFormat,
                say: Progress) -> tuple[Path, dict[str, Any]]:
    path = convert_to_gguf(source, out / f"{source.name}.{spec.gguf_type}.gguf",
                           qtype=spec.gguf_type, progress=say)
    return path, {"gguf_type": spec.gguf_type, "tensor_types": _gguf_tensor_types(path)}


def _write_int8(source: Path, out: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    model = _load_source(source, "auto")
    names = _quantizable(model)
    for name in names:
        set_submodule(model, name, Int8Linear.from_linear(model.get_submodule(name)))
    save_file(_unique_state(model), out / "model.safetensors", metadata={"format": "pt"})
    _copy_side_files(source, out)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {
        "quant_method": INT8_METHOD, "bits": 8, "compute_dtype": "bfloat16",
        "scheme": "symmetric, one scale per output channel, weight-only", "modules": names}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {"quantized_layers": len(names), "granularity": "channel",
            "compute_dtype": "bfloat16", "kernel": "torch._weight_int8pack_mm"}


def _write_compressed(source: Path, out: Path, bits: int) -> dict[str, Any]:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = _load_source(source, torch.float32)
    names = _quantizable(model)
    layers = [model.get_submodule(n) for n in names]
    group = next((g for g in GROUP_SIZES if all(m.in_features % g == 0 for m in layers)), None)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, dynamic=False,
                               strategy="group" if group else "channel", group_size=group)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=ignore, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config, show_progress=False)
    for m in layers:
        w = m.weight.detach().float()
        w = w.reshape(w.shape[0], -1, group) if group else w.unsqueeze(1)
        scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), m.quantization_scheme.weights)
        # rounded to bfloat16 before compressing, so the integers match the scale vLLM reads
        m.weight_scale.data.copy_(scale.to(torch.bfloat16).float())
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.to(torch.bfloat16)  # float tensors only: the packed integers stay as they are
    model.save_pretrained(out)
    compressor.update_config(out)
    _copy_side_files(source, out)
    qconfig = json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    return {"quantized_layers": len(names), "bits": bits,
            "granularity": f"group of {group}" if group else "channel",
            "compressed_tensors_format": qconfig["format"], "ignored": ignore,
            "notes": _vllm_notes(layers)}


def _vllm_notes(layers: list[nn.Linear]) -> list[str]:
    """What vLLM's Marlin WNA16 kernels will refuse (they need in % 128 == 0, out % 64 == 0)."""
    shapes = sorted({(m.in_features, m.out_features) for m in layers
                     if m.in_features % 128 or m.out_features % 64})
    if not shapes:
        return []
    return [(f"layers shaped (in, out) {shapes} do not fit vLLM's Marlin kernels "
             "(in % 128, out % 64): vLLM must pick another WNA16 kernel for them on the GPU")]


# --- fidelity --------------------------------------------------------------------------------


def _reference(source: Path, spec: QuantFormat, tmp: Path, say: Progress) -> Path:
    """The unquantized model on the engine that serves the artifact."""
    if spec.kind != "gguf":
        return source

    return convert_to_gguf(source, tmp / f"{source.name}.F32.gguf", qtype="F32", progress=say)


def _fidelity(reference: Path, artifact: Path, spec: QuantFormat, prompts: Sequence[Prompt],
              teacher: Sequence[str] | None, max_new_tokens: int,
              say: Progress) -> dict[str, Any]:
    say(f"answering {len(prompts)} prompts with the unquantized model ({reference.name})")
    ref = answer_all(str(reference), prompts, max_tokens=max_new_tokens)
    say(f"answering {len(prompts)} prompts with the quantized model ({artifact.name})")
    got = answer_all(str(artifact), prompts, max_tokens=max_new_tokens)
    ref_texts, got_texts = [a.text for a in ref], [a.text for a in got]
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "engine": "llamacpp" if spec.kind == "gguf" else "transformers",
        "reference": str(reference) if spec.kind != "gguf" else "F32 GGUF of the source",
        "vs_unquantized": _agreement(got_texts, ref_texts),
        "vs_teacher": None,
        "speed": {"unquantized": _speed(ref), "quantized": _speed(got)},
    }
    if teacher is not None:
        before, after = _agreement(ref_texts, teacher), _agreement(got_texts, teacher)
        report["vs_teacher"] = {"unquantized": before, "quantized": after,
                                "delta": {k: after[k] - before[k] for k in before}}
    return report


def _agreement(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {"rouge_l": text_fidelity(answers, references)["rouge_l"],
            "exact_match": sum(exact_match(a, r) for a, r in zip(answers, references))
            / len(answers)}


def _speed(answers: Sequence[Any]) -> dict[str, float | None]:
    tokens = sum(a.completion_tokens for a in answers)
    seconds = sum(a.latency_s for a in answers)
    ttfts = [a.ttft_s for a in answers if a.ttft_s is not None]
    return {"completion_tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "mean_ttft_s": sum(ttfts) / len(ttfts) if ttfts else None}


# --- files and models ------------------------------------------------------------------------


def _check_source(source: Path) -> None:
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder (give a Hugging Face model folder, "
                                "e.g. a distilled student)")
    config_file = source / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{source}: no config.json, not a Hugging Face model folder")
    if not any(source.glob("*.safetensors")):
        raise FileNotFoundError(f"{source}: no *.safetensors weights")
    if "quantization_config" in json.loads(config_file.read_text(encoding="utf-8")):
        raise ValueError(f"{source} is already quantized: quantize the unquantized model")


def _load_source(source: Path, dtype: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True).eval()


def _quantizable(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` layers to quantize: all but the output head and any whose
    weight is an embedding's (tied)."""
    head = model.get_output_embeddings()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and id(m.weight) not in embeddings]


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied aliases (safetensors refuses shared tensors)."""
    aliases = tied_aliases(model)
    return {k: v.contiguous() for k, v in model.state_dict().items() if k not in aliases}


def _copy_side_files(source: Path, out: Path) -> None:
    """Tokenizer, chat template, generation config...: top-level non-weight files of `source`
    that `out` does not have yet."""
    for path in sorted(source.iterdir()):
        if (path.is_file() and path.suffix not in _WEIGHT_FILES
                and path.name not in _SKIPPED_FILES and not (out / path.name).exists()):
            shutil.copy2(path, out / path.name)


def _weight_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def _weight_stats(path: Path) -> dict[str, int]:
    """file_bytes, tensor_bytes (the tensors' data) and elements (logical weights) of a GGUF
    file or of a folder's safetensors (packed integers count as their stored elements)."""
    if path.is_file():
        import gguf

        tensors = gguf.GGUFReader(path).tensors
        return {"file_bytes": path.stat().st_size,
                "tensor_bytes": sum(int(t.n_bytes) for t in tensors),
                "elements": sum(int(t.n_elements) for t in tensors)}
    stats = {"file_bytes": 0, "tensor_bytes": 0, "elements": 0}
    for file in _weight_files(path):
        stats["file_bytes"] += file.stat().st_size
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                stats["tensor_bytes"] += end - start
                stats["elements"] += math.prod(entry["shape"])
    return stats


def _gguf_tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != REPORT_FILE)
