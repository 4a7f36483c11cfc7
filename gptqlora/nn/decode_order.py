"""Each decode launch told which packed weight the next one reads, so that it can ask L2 for it ahead.

Why: at batch 1 a 7B layer's launch is too short for its own ramp and split-K tail (10-35 us for 8-45 MB at 4
bit), and the DRAM idles through them and through the small kernels between two layers. The one-token kernel
can ask L2 for the next launch's words while it finishes (kernels/gemv_m1.ahead_config, GPTQLORA_L2_AHEAD).
It needs to know which tensor that is: the one-launch copies of sibling groups (q|k|v, gate|up: the leader's
`group_qweight`) and each other layer's decode copy (`gemv_plan`'s read tensor).

The order is the modules' registration order, which is the execution order of the LLaMA-family blocks this
tool targets (q, k, v, o; gate, up, down). For any other order the prefetches are only wasted reads: a hint
never changes a result. A layer that no GPTQ launch serves (fp16 kept layers, SpQR layers, the lm_head) breaks
the chain: the launch before it asks for nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from gptqlora.nn.quant_linear import QuantLinear


ADAPTER_PARTS = frozenset({"lora_A", "lora_B"})  # the adapters' own nn.Linear parts: fused into the launches


def launches(model: nn.Module) -> list[tuple[QuantLinear, torch.Tensor] | None]:
    """The model's GPTQ decode launches in order, as (the layer that launches, the packed weight it reads), with
    None where another kind of layer runs between two. Call after the plans exist (inference.prepare_decode)."""
    grouped: dict[int, QuantLinear] = {}  # id(base layer) -> its sibling group's leader, where they share a launch
    for mod in model.modules():
        group = getattr(mod, "siblings", None)
        if group is None:
            continue
        bases = [getattr(m, "base_layer", None) for m in group.layers]
        leader = bases[0]
        if type(leader) is QuantLinear and getattr(leader, "_group_gemv", None) is not None:
            grouped.update({id(b): leader for b in bases})
    out: list[tuple[QuantLinear, torch.Tensor] | None] = []
    done: set[int] = set()
    for name, mod in model.named_modules():
        if type(mod) is QuantLinear:
            leader = grouped.get(id(mod), mod)
            if id(leader) in done:
                continue
            done.add(id(leader))
            if id(mod) in grouped:
                read = leader.group_qweight
            else:
                plan = mod.gemv_plan()
                read = plan[0] if plan is not None else None
            out.append((leader, read) if read is not None else None)
        elif ADAPTER_PARTS.isdisjoint(name.split(".")) and (isinstance(mod, nn.Linear) or hasattr(mod, "qweight")):
            out.append(None)  # a layer another kernel reads (fp16 kept, SpQR, lm_head): the chain breaks here
    return out


def link_ahead(model: nn.Module) -> int:
    """Sets every GPTQ layer's `decode_ahead` to the packed weight of the launch after its own (None where the
    next layer is not a GPTQ launch, and for layers that do not launch). Returns how many were linked."""
    for mod in model.modules():
        if type(mod) is QuantLinear:
            mod.decode_ahead = None
    order = launches(model)
    linked = 0
    for unit, after in zip(order, order[1:] + [None]):
        if unit is not None and after is not None:
            unit[0].decode_ahead = after[1]
            linked += 1
    return linked
