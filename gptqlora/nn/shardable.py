"""Packed buffers as frozen float32 parameters, so that FSDP2 (`fully_shard`) can shard the packed base.

FSDP shards parameters, not buffers, and flattens them into float all-gather buffers. Here each packed
tensor (qweight/qzeros int32, scales fp16, g_idx int32) is re-registered as a frozen parameter
`<name>_packed` holding the same bytes viewed as float32 (fms-acceleration does this for GPTQ, Answer.AI's
fsdp_qlora for bitsandbytes); the layer reads it back in its own dtype. The bytes travel unchanged through
an all-gather, which copies. What must not touch them: a mixed-precision policy that casts parameters
(FSDP2's `MixedPrecisionPolicy(param_dtype=...)`, accelerate's FSDP `mixed_precision`), weight decay and
any optimizer (they are frozen), and `state_dict` writers (the keys become `<name>_packed`: save adapters
only). Outside forward, under FSDP2, each rank holds only its shard of the words.
"""

from __future__ import annotations

import torch
from torch import nn

from gptqlora.nn.quant_linear import QuantLinear

PACKED = ("qweight", "qzeros", "scales", "g_idx")
SUFFIX = "_packed"


class ShardableQuantLinear(QuantLinear):
    """A QuantLinear whose packed tensors are float32-viewed frozen parameters (see the module doc)."""

    def __getattr__(self, name: str):
        dtypes = self.__dict__.get("_packed_dtypes")
        if dtypes is not None and name in dtypes:
            dtype, shape = dtypes[name]
            return nn.Module.__getattr__(self, name + SUFFIX).view(dtype).view(shape)  # the unsharded words
        return super().__getattr__(name)


def make_shardable(model: nn.Module) -> int:
    """Turn every QuantLinear of `model` into a ShardableQuantLinear in place; returns how many."""
    n = 0
    for mod in model.modules():
        if type(mod) is not QuantLinear:
            continue
        dtypes = {}
        for name in PACKED:
            t = mod._buffers.pop(name).contiguous()
            dtypes[name] = (t.dtype, t.shape)
            flat = t.reshape(-1).view(torch.uint8)  # any dtype's bytes as float32 words (4-byte aligned)
            if flat.numel() % 4:
                raise ValueError(f"{name} of {t.numel()} x {t.element_size()} bytes is not a whole number of "
                                 f"float32 words")
            mod.register_parameter(name + SUFFIX, nn.Parameter(flat.view(torch.float32), requires_grad=False))
        mod._packed_dtypes = dtypes
        mod.__class__ = ShardableQuantLinear
        mod._plan = mod._plan_key = None
        n += 1
    return n

