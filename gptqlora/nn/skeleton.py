"""Empty QuantLinear layers in place of a model's linears: shapes only, for sizing and benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from gptqlora.nn.quant_linear import QuantLinear

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_skeleton(model: nn.Module, bits: int, group_size: int, device: str | torch.device = "meta",
                      targets: tuple[str, ...] = LLAMA_PROJECTIONS) -> nn.Module:
    """Swap the target nn.Linear layers of `model` for empty QuantLinear layers (no data).

    A 65B-shaped model on the meta device costs no memory.
    """
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            model.set_submodule(name, QuantLinear(mod.in_features, mod.out_features, bits, group_size,
                                                  bias=mod.bias is not None, device=device))
    return model
