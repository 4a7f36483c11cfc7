"""Model structure helpers for the LLaMA family (LLaMA, Mistral, Qwen2 share the block layout)."""

from __future__ import annotations

from torch import nn

# True-sequential order inside a decoder block: each group is quantized after the previous ones, seeing
# their quantized outputs. Linears not named here form a last group.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


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
