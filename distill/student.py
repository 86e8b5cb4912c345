"""Student construction: a smaller model initialised from the teacher by keeping some of its layers.

Owns loading a teacher (an HF folder or a GGUF file, dequantized) and building a student from it
the way DistilBERT was initialised (Sanh et al. 2019): the same architecture with fewer decoder
layers, whose embeddings, final norm, lm_head and kept layers are copies of the teacher's. The
student is written as an HF folder (safetensors, config, generation config, the teacher's
tokenizer) with `student_init.json` recording where it came from. Does not own training, the
losses or quantization.

Supported: decoder-only HF models whose layers are `model.model.layers` (llama, qwen2, mistral,
...; tested on llama and qwen2). The config is cut to match: `num_hidden_layers`, per-layer lists
(`layer_types` and other `*layer_types` / `*_per_layer` lists, `no_rope_layers`), layer-index
lists (`mlp_only_layers`) and qwen2's `max_window_layers`. Any other list-valued config field
that names layers is refused rather than guessed.

Kept layers keep their order; student layer j is teacher layer `kept[j]`.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# Files of an HF tokenizer, copied as they are from the teacher's folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "chat_template.jinja", "chat_template.json")
INIT_FILE = "student_init.json"
_LAYER_INDEX_LISTS = ("mlp_only_layers",)  # lists of layer indices, renumbered


def load_teacher(path: str | Path, gguf_file: str | None = None,
                 dtype: torch.dtype | str = torch.float32
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from local files only, never a hub.

    `path`: an HF model folder; a folder holding `gguf_file`; or a `.gguf` file itself. A GGUF is
    dequantized to `dtype` by transformers, tokenizer (and chat template) included, and left
    with no quantizer, so the model trains and `save_pretrained` writes plain safetensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if gguf_file is None and folder.suffix == ".gguf":
        folder, gguf_file = folder.parent, folder.name
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {folder}")
    elif not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model at {folder} (config.json missing): give an HF model "
                                "folder, or a GGUF file (a .gguf path, or gguf_file=)")
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                 **extra)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    if gguf_file:  # the weights are already dequantized: drop what would stop a save
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer


def kept_layers(n_layers: int, keep_layers: list[int] | None = None,
                every: int | None = None) -> list[int]:
    """The teacher layers to keep: `keep_layers` as given, or every `every`-th from layer 0
    (`every=3` of 10: [0, 3, 6, 9]). Exactly one of the two; indices increasing, in range."""
    if (keep_layers is None) == (every is None):
        raise ValueError("give exactly one of keep_layers (e.g. [0, 2, 4]) or every (e.g. 2)")
    if every is not None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        return list(range(0, n_layers, every))
    keep = list(keep_layers)
    if not keep:
        raise ValueError("keep_layers is empty: keep at least one layer")
    for i in keep:
        if not isinstance(i, int) or not 0 <= i < n_layers:
            raise ValueError(f"keep_layers holds {i!r}, but the teacher has {n_layers} layers: "
                             f"indices must be integers from 0 to {n_layers - 1}")
    if any(b <= a for a, b in itertools.pairwise(keep)):
        raise ValueError(f"keep_layers must be strictly increasing (no repeats), got {keep}")
    return keep


def student_config(config: PreTrainedConfig, keep: list[int]) -> PreTrainedConfig:
    """A copy of the teacher's config cut to the layers in `keep` (see the module docstring);
    `quantization_config` dropped (the student's weights are plain tensors)."""
    n = config.num_hidden_layers
    d = config.to_dict()
    d.pop("quantization_config", None)
    for name, value in config.to_dict().items():
        if not isinstance(value, list | tuple) or "layer" not in name:
            continue
        if name.endswith(("layer_types", "_per_layer")) or name == "no_rope_layers":
            if len(value) != n:
                raise ValueError(f"config field {name} has {len(value)} entries for {n} layers")
            d[name] = [value[i] for i in keep]
        elif name in _LAYER_INDEX_LISTS:
            d[name] = [j for j, i in enumerate(keep) if i in value]
        else:
            raise ValueError(f"config field {name}={value!r} refers to layers and init_student "
                             f"does not know how to cut it for a {config.model_type} model")
    if isinstance(d.get("max_window_layers"), int):  # qwen2: layers below it use full attention
        d["max_window_layers"] = sum(1 for i in keep if i < d["max_window_layers"])
    d["num_hidden_layers"] = len(keep)
    return type(config).from_dict(d)


def init_student(teacher_dir_or_model: str | Path | PreTrainedModel, out_dir: str | Path, *,
                 keep_layers: list[int] | None = None, every: int | None = None,
                 gguf_file: str | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 dtype: torch.dtype | str = torch.float32) -> Path:
    """Write a student made of the teacher's layers `keep_layers` (or every `every`-th) to
    `out_dir` (new or empty) and return it.

    `teacher_dir_or_model`: a path as `load_teacher` takes it (loaded in `dtype`; "auto" keeps
    an HF folder's own dtype), or a model already loaded. The tokenizer files are copied from
    the teacher's folder; a GGUF teacher's tokenizer, or `tokenizer` when given, is saved with
    `save_pretrained` instead.
    """
    from transformers.initialization import no_init_weights

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: give a new folder")
    if isinstance(teacher_dir_or_model, str | Path):
        teacher, loaded_tokenizer = load_teacher(teacher_dir_or_model, gguf_file, dtype)
        source = Path(teacher_dir_or_model)
        folder = source.parent if source.suffix == ".gguf" else source
        gguf_file = gguf_file or (source.name if source.suffix == ".gguf" else None)
        if tokenizer is None and gguf_file:
            tokenizer = loaded_tokenizer
    else:  # a model in memory: its tokenizer from the folder it was loaded from, if any
        teacher = teacher_dir_or_model
        name = getattr(teacher, "name_or_path", "")
        source = folder = Path(name) if name else None
    layers = _decoder_layers(teacher)
    n = len(layers)
    keep = kept_layers(n, keep_layers, every)
    tokenizer_files = [folder / f for f in TOKENIZER_FILES if folder and (folder / f).is_file()]
    if tokenizer is None and not tokenizer_files:
        raise ValueError(f"no tokenizer files in {folder or 'the teacher model folder'}: pass "
                         "tokenizer= so that the student folder is complete")

    config = student_config(teacher.config, keep)
    with no_init_weights():  # every weight is overwritten from the teacher below
        student = type(teacher)(config)
    teacher_dtype = next(teacher.parameters()).dtype
    student = student.to(teacher_dtype)
    student.load_state_dict(_student_state(teacher, student, keep))
    student.generation_config = copy.deepcopy(teacher.generation_config)

    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    else:
        for f in tokenizer_files:
            shutil.copyfile(f, out / f.name)
    record = {
        "teacher": str(source) if source else None,
        "gguf_file": gguf_file,
        "model_type": config.model_type,
        "method": "layer selection (DistilBERT-style initialisation)",
        "teacher_layers": n,
        "kept_layers": keep,
        "student_layers": len(keep),
        "teacher_parameters": teacher.num_parameters(),
        "student_parameters": student.num_parameters(),
        "dtype": str(teacher_dtype).removeprefix("torch."),
    }
    (out / INIT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def _decoder_layers(model: Any) -> torch.nn.ModuleList:
    """`model.model.layers` of a decoder-only HF model, or a ValueError naming what it is."""
    config = getattr(model, "config", None)
    name = getattr(config, "model_type", None) or type(model).__name__
    layers = getattr(getattr(model, "model", None), "layers", None)
    if (config is None or getattr(config, "is_encoder_decoder", False)
            or not isinstance(layers, torch.nn.ModuleList)
            or getattr(config, "num_hidden_layers", None) != len(layers)):
        raise ValueError(f"init_student supports decoder-only HF models whose layers are "
                         f"`model.model.layers` (llama, qwen2, mistral, ...); {name} "
                         f"({type(model).__name__}) is not one")
    return layers


def _student_state(teacher: Any, student: Any, keep: list[int]) -> dict[str, torch.Tensor]:
    """The student's state dict filled from the teacher's: `model.layers.{j}.*` from
    `model.layers.{keep[j]}.*`, everything else (embeddings, norm, lm_head) by name."""
    source = teacher.state_dict()
    state = {}
    for key, value in student.state_dict().items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            parts[2] = str(keep[int(parts[2])])
        teacher_key = ".".join(parts)
        if teacher_key not in source or source[teacher_key].shape != value.shape:
            found = tuple(source[teacher_key].shape) if teacher_key in source else "missing"
            raise ValueError(f"student weight {key} {tuple(value.shape)} has no match in the "
                             f"teacher ({teacher_key}: {found}); the {teacher.config.model_type} "
                             "architecture has layer-dependent settings init_student does not "
                             "handle")
        state[key] = source[teacher_key]
    return state
