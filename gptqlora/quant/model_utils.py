"""Model structure helpers for the LLaMA family (LLaMA, Mistral, Qwen2 share the block layout)."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# True-sequential order inside a decoder block: each group is quantized after the previous ones, seeing
# their quantized outputs. Linears not named here form a last group.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def build_empty_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model skeleton with parameters on the meta device (no memory); buffers are real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.endswith("layers"):
            return name, mod
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: gptqlora supports "
                     f"LLaMA-family models (a `model.layers` ModuleList)")


def linear_groups(block: nn.Module, true_sequential: bool = True) -> list[list[str]]:
    """Names of the block's nn.Linear modules, grouped in the order they are quantized."""
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if not true_sequential:
        return [linears]
    groups = [[n for n in g if n in linears] for g in SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    named = {n for g in groups for n in g}
    rest = [n for n in linears if n not in named]
    return groups + ([rest] if rest else [])


def quantize_skeleton(model: nn.Module, bits: int, group_size: int, device: str | torch.device = "meta",
                      targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                  "up_proj", "down_proj")) -> nn.Module:
    """Swap the target nn.Linear layers of `model` for empty QuantLinear layers (shapes only, no data).

    For sizing and benchmarks: a 65B-shaped model on the meta device costs no memory.
    """
    from gptqlora.nn.quant_linear import QuantLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            model.set_submodule(name, QuantLinear(mod.in_features, mod.out_features, bits, group_size,
                                                  bias=mod.bias is not None, device=device))
    return model
