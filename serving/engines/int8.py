"""The int8 weight-only layer the `transformers` engine runs, and loading a folder that
`protege quantize --to int8` wrote (`distill.quantize` writes it with the same layer).

The folder is marked by `quantization_config.quant_method = "protege-int8"` in config.json, which
lists the swapped layers; each keeps its weights as int8 with one scale per output channel and
multiplies with torch's fused CPU kernel `_weight_int8pack_mm`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

INT8_METHOD = "protege-int8"  # config.json quantization_config.quant_method of an int8 folder

class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W kept as int8 ``[out, in]`` and one scale per output channel
    (W ≈ qweight · scales[:, None]). The matmul is torch's fused `_weight_int8pack_mm`, fed
    `compute_dtype` activations; the result comes back in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=compute_dtype))
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear,
                    compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Symmetric round-to-nearest: scale = max |row| / 127, rounded to `compute_dtype`
        first so that the integers are chosen for the scale the kernel multiplies by."""
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).to(compute_dtype).float()
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row
        module = cls(linear.in_features, linear.out_features, linear.bias, compute_dtype)
        module.qweight.copy_(torch.round(w / scales[:, None]).clamp_(-127, 127))
        module.scales.copy_(scales)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


def is_int8_folder(folder: str | Path) -> bool:
    """Whether `folder` holds an `int8` artifact (its config.json carries our marker)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == INT8_METHOD


def load_int8(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An `int8` folder as a causal LM in eval mode: the listed layers are `Int8Linear` (int8 in
    memory, never dequantized), the rest in `dtype`. Local files only."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    spec = config.quantization_config
    del config.quantization_config  # the skeleton is a plain model; the layers are swapped below
    with no_init_weights():  # every tensor is about to be overwritten
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights
    compute = getattr(torch, spec.get("compute_dtype", "bfloat16"))
    for name in spec["modules"]:
        linear = model.get_submodule(name)
        set_submodule(model, name, Int8Linear(linear.in_features, linear.out_features,
                                               linear.bias, compute))
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_aliases(model)]  # tied: loaded under another name
    if missing or unexpected:
        raise ValueError(f"{folder}: not a complete int8 model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model.eval()


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def tied_aliases(model: nn.Module) -> set[str]:
    """State-dict keys naming a tensor that an earlier key already names (tied weights)."""
    seen, aliases = set(), set()
    for key, tensor in model.state_dict().items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and where in seen:
            aliases.add(key)
        seen.add(where)
    return aliases
