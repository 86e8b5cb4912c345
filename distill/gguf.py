"""GGUF export: a Hugging Face causal-LM folder -> one GGUF file that llama.cpp loads and serves.

Owns the conversion of what distillation writes (safetensors, `config.json`, a byte-level BPE
`tokenizer.json` with its `tokenizer_config.json` and chat template) into GGUF at one of
`GGUF_TYPES`. The weights are written as F32 or F16 with the `gguf` package (architecture
metadata, tensors renamed by its tensor-name map, the tokenizer and chat template), and F16/F32
is quantized to Q8_0, Q4_0 or Q4_K_M by llama.cpp itself (`llama_model_quantize` through
llama-cpp-python). Does not own training, choosing the type, or serving the file.

Supported: `llama` and `qwen2` models (llama's q/k projections are permuted from HF's
rotate-half layout to llama.cpp's interleaved rope; qwen2 uses NEOX rope and is written as is),
rope scaling `linear`, `yarn` and llama's `llama3`. Tokenizers: byte-level BPE (llama.cpp's
`gpt2` tokenizer model) whose pre-tokenizer is one llama.cpp implements, see `PRE_TOKENIZERS`;
anything else (word-level, SentencePiece, unknown split rules) is refused rather than written
with a tokenizer that would split text differently from the HF one. The GGUF tokenizes like the
folder's `tokenizer.json`: a SmolLM2 folder that transformers rebuilt from a GGUF has a plain
ByteLevel pre-tokenizer (no digit splitting) and gets `gpt-2`, not SmolLM2's own `smollm`.

Q4_K_M: k-quants work on rows of 256 values. llama.cpp quantizes a tensor whose rows are not a
multiple of 256 with a fallback type instead (Q4_K -> Q5_0, Q6_K -> Q8_0), so a model narrower
than 256 (the 64-wide test models) gets a file of Q5_0/Q8_0 tensors, and SmolLM2-135M (576
wide) 180 of its 272 tensors; the progress callback reports the types the file ended up with.

(Over 400 lines: one conversion, its steps in the order they run; each helper is small.)
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase

GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M")
_QUANTIZED = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
              "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # llama_cpp constant names

# HF model_type -> (GGUF architecture, q/k rows permuted to llama.cpp's interleaved rope)
ARCHITECTURES = {"llama": (gguf.MODEL_ARCH.LLAMA, True), "qwen2": (gguf.MODEL_ARCH.QWEN2, False)}

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# A tokenizer.json pre-tokenizer, as the steps `_pre_tokenizer_steps` reads -> llama.cpp's
# `tokenizer.ggml.pre` that splits text the same way.
PRE_TOKENIZERS: dict[tuple[tuple[Any, ...], ...], str] = {
    (("ByteLevel", True, False),): "gpt-2",  # GPT-2's regex inside ByteLevel
    (("Digits", True), ("ByteLevel", True, False)): "smollm",  # digits one by one, then GPT-2's
    (("Split", _QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "qwen2",
    (("Split", _LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
}
_YARN_TUNING = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
_NORMALIZERS = (None, "NFC")  # llama.cpp does not normalize; NFC only differs on non-NFC text


def convert_to_gguf(model_dir: str | Path, out_file: str | Path, *, qtype: str = "Q8_0",
                    progress: Callable[[str], None] | None = None) -> Path:
    """Write the HF model in `model_dir` to the new GGUF file `out_file` at `qtype` (one of
    `GGUF_TYPES`) and return its path.

    F32/F16 are written directly; other types go through an F32 (F16 when every weight is
    float16) file next to `out_file`, quantized by llama.cpp and deleted. `out_file` appears only
    once complete. `progress` gets one line per step.
    """
    say = progress or (lambda _message: None)
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    folder, out = Path(model_dir), Path(out_file)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no HF model at {folder} (config.json missing)")
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new file name")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")

    config = _load_config(folder)
    arch, permute = model_arch(config.model_type)
    _check_supported(config)
    tokenizer = _load_tokenizer(folder)
    float_type = qtype if qtype in ("F32", "F16") else _intermediate_type(weights)

    out.parent.mkdir(parents=True, exist_ok=True)
    with _temp_path(out, f".{float_type.lower()}.gguf") as floats:
        say(f"writing {float_type} GGUF ({gguf.MODEL_ARCH_NAMES[arch]}) from {folder}")
        _write_float_gguf(folder, weights, floats, config, tokenizer, arch, permute, float_type)
        if qtype == float_type:
            _publish(floats, out)
        else:
            with _temp_path(out, f".{qtype.lower()}.gguf") as quantized:
                say(f"quantizing to {qtype} with llama.cpp")
                quantize_gguf(floats, quantized, qtype, say)
                _publish(quantized, out)
    counts = ", ".join(f"{n} {t}" for t, n in sorted(_tensor_types(out).items()))
    say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; tensors: {counts})")
    return out


def model_arch(model_type: str) -> tuple[gguf.MODEL_ARCH, bool]:
    """(GGUF architecture, whether q/k are permuted) for an HF `model_type`; ValueError if
    unsupported."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"cannot write a {model_type!r} model as GGUF: supported architectures "
                         f"are {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """A q or k projection (weight [n_head * head_dim, ...] or bias) from HF's rotate-half rope
    layout (each head's rows: first halves of the pairs, then second halves) to llama.cpp's
    interleaved pairs. transformers' GGUF loader applies the inverse."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE `tokenizer.json` (parsed), or a
    ValueError naming the tokenizer kinds that are supported."""
    model = (tokenizer_json.get("model") or {}).get("type")
    steps = _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"))
    byte_level = any(s[0] == "ByteLevel" for s in steps)
    if model != "BPE" or not byte_level:
        raise ValueError(f"cannot write this tokenizer as GGUF (model {model!r}, pre-tokenizer "
                         f"{[s[0] for s in steps]}): only byte-level BPE tokenizers "
                         "(a BPE model with a ByteLevel pre-tokenizer) are supported")
    if steps not in PRE_TOKENIZERS:
        known = "; ".join(f"{name}: {' + '.join(s[0] for s in k)}"
                          for k, name in PRE_TOKENIZERS.items())
        raise ValueError(f"llama.cpp has no pre-tokenizer that splits text like {steps}; "
                         f"supported: {known}")
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    if normalizer not in _NORMALIZERS:
        raise ValueError(f"tokenizer normalizer {normalizer!r} is not applied by llama.cpp; "
                         "supported: none or NFC")
    return PRE_TOKENIZERS[steps]


def vocab_tokens(tokenizer: PreTrainedTokenizerBase,
                 vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """GGUF token strings and types for ids 0..vocab_size-1: added special tokens are CONTROL,
    other added tokens USER_DEFINED, ids the tokenizer lacks (a padded embedding) UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size "
                         f"is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer_steps(pre: dict[str, Any] | None) -> tuple[tuple[Any, ...], ...]:
    """A tokenizer.json pre-tokenizer as comparable steps: ("ByteLevel", use_regex,
    add_prefix_space), ("Digits", individual_digits), ("Split", pattern, behavior, invert), or
    (type,) for any other kind."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _pre_tokenizer_steps(p))
    if kind == "ByteLevel":
        return ((kind, pre.get("use_regex", True), pre.get("add_prefix_space", False)),)
    if kind == "Digits":
        return ((kind, pre.get("individual_digits", False)),)
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        return ((kind, pattern.get("Regex", pattern.get("String")), pre.get("behavior"),
                 pre.get("invert", False)),)
    return ((kind,),)


def _load_config(folder: Path) -> PreTrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}: only byte-level BPE tokenizers "
                                "saved as tokenizer.json are supported")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _check_supported(config: PreTrainedConfig) -> None:
    """Refuse settings llama.cpp's llama/qwen2 graphs would silently compute differently."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: llama.cpp's {config.model_type} uses silu")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True: llama.cpp's qwen2 attends to the whole "
                         "context, so answers past the window would differ")


def _intermediate_type(weights: list[Path]) -> str:
    """F16 when every floating weight is stored as float16 (nothing lost), else F32."""
    from safetensors import safe_open

    for path in weights:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if f.get_slice(name).get_dtype() not in ("F16", "I64", "I32"):
                    return "F32"
    return "F16"


@contextlib.contextmanager
def _temp_path(out: Path, suffix: str) -> Iterator[Path]:
    """A new hidden file name next to `out` (created by whoever writes it, so with the usual
    permissions), removed on exit if still there."""
    path = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _publish(done: Path, out: Path) -> None:
    """Move the finished file to `out`, not over a file that appeared meanwhile."""
    if out.exists():
        raise FileExistsError(f"{out} appeared while converting: not overwritten")
    os.replace(done, out)


def _write_float_gguf(folder: Path, weights: list[Path], path: Path, config: PreTrainedConfig,
                      tokenizer: PreTrainedTokenizerBase, arch: gguf.MODEL_ARCH, permute: bool,
                      float_type: str) -> None:
    """The whole model as an F32 or F16 GGUF at `path`, one tensor in memory at a time."""
    from safetensors import safe_open

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "F32"
                         else gguf.LlamaFileType.MOSTLY_F16)
    _add_hparams(writer, config)
    _add_tokenizer(writer, folder, tokenizer, config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    plan = list(_tensor_plan(weights, config, arch))
    extra = _extra_tensors(config)
    dtype = {"F32": np.float32, "F16": np.float16}[float_type]

    def stored(ndim: int) -> np.dtype:
        return np.dtype(np.float32 if ndim < 2 else dtype)  # norms and biases stay F32

    try:
        for name, _, _, shape in plan:
            t = stored(len(shape))
            writer.add_tensor_info(name, shape, t, int(np.prod(shape)) * t.itemsize)
        for name, value in extra.items():
            writer.add_tensor_info(name, value.shape, value.dtype, value.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for file, group in itertools.groupby(plan, key=lambda row: row[1]):
            with safe_open(file, framework="pt") as f:
                for name, _, hf_name, shape in group:
                    tensor = _to_gguf_layout(hf_name, f.get_tensor(hf_name).float(), config,
                                             permute)
                    writer.write_tensor_data(tensor.numpy().astype(stored(len(shape))))
        for value in extra.values():
            writer.write_tensor_data(value)
    finally:
        writer.close()


def _tensor_plan(weights: list[Path], config: PreTrainedConfig,
                 arch: gguf.MODEL_ARCH) -> Iterator[tuple[str, Path, str, tuple[int, ...]]]:
    """(GGUF name, file, HF name, shape) for each weight to write, in file order."""
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for file in weights:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp
                    continue
                if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # tied: llama.cpp reuses token_embd when output.weight is absent
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ValueError(f"weight {hf_name} of {file.name} has no GGUF name for a "
                                     f"{config.model_type} model")
                yield name, file, hf_name, tuple(f.get_slice(hf_name).get_shape())


def _to_gguf_layout(hf_name: str, tensor: torch.Tensor, config: PreTrainedConfig,
                    permute: bool) -> torch.Tensor:
    if permute and ".self_attn.q_proj." in hf_name:
        return permute_qk(tensor, config.num_attention_heads)
    if permute and ".self_attn.k_proj." in hf_name:
        return permute_qk(tensor, _kv_heads(config))
    return tensor


def _kv_heads(config: PreTrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config: PreTrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config: PreTrainedConfig) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or {})


def _add_hparams(writer: gguf.GGUFWriter, config: PreTrainedConfig) -> None:
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        tuned = sorted(k for k in _YARN_TUNING if rope.get(k) is not None)
        if tuned:
            raise ValueError(f"yarn rope with {', '.join(tuned)} set is not supported: only "
                             "factor and original_max_position_embeddings are carried to GGUF")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or config.max_position_embeddings))
    elif kind == "llama3" and config.model_type == "llama":
        pass  # a rope_freqs tensor, see _extra_tensors
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported for {config.model_type}: "
                         "supported are default, linear, yarn (and llama3 for llama)")


def _extra_tensors(config: PreTrainedConfig) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the HF folder does not hold: llama3 rope's per-frequency
    divisors (`rope_freqs.weight`, base inverse frequency / scaled one)."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = _head_dim(config)
    base = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64)
                                                 / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return {"rope_freqs.weight": (base / scaled.to(torch.float64)).numpy().astype(np.float32)}


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, tokenizer: PreTrainedTokenizerBase,
                   vocab_size: int) -> None:
    """Vocabulary, merges, special ids, add-BOS/EOS flags and chat template."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pre = pre_tokenizer_name(spec)
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    # what HF really does to a plain encode, whatever the files claim
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bos is not None and full[0] == bos != plain[0]
    special.add_special_token["eos"] = eos is not None and full[-1] == eos != plain[-1]
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def quantize_gguf(src: Path, dst: Path, qtype: str, say: Callable[[str], None], *,
                  requantize: bool = False) -> None:
    """`src` (F32/F16 GGUF; any type with `requantize`, at a loss on top of its own) quantized to
    `qtype` at `dst` by llama.cpp. Its log is kept, not printed: the k-quant fallback summary
    goes to `say`, the tail to the error if it fails."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _QUANTIZED[qtype])
    params.allow_requantize = requantize
    params.nthread = os.cpu_count() or 1
    with _llama_log() as log:
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                                ctypes.byref(params))
    lines = "".join(log).splitlines()
    if failed:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype} (code {failed}): "
                           + " | ".join(lines[-5:]))
    for line in lines:
        if "fallback quantization" in line:  # "N of M tensor(s) required fallback quantization"
            say(f"llama.cpp: {line.split('WARNING:')[-1].strip()} (rows not a multiple of 256)")


@contextlib.contextmanager
def _llama_log() -> Iterator[list[str]]:
    """llama.cpp's log text while inside (process-wide), then its previous log callback back."""
    import llama_cpp

    text: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(_level: int, message: bytes, _user_data: ctypes.c_void_p) -> None:
        text.append(message.decode("utf-8", "replace"))

    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield text
    finally:
        llama_cpp.llama_log_set(previous, user_data)


def _tensor_types(path: Path) -> Counter[str]:
    """How many tensors of each type (F32, Q8_0, ...) the GGUF at `path` holds."""
    return Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
