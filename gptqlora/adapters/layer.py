"""GPTQLoraLinear: trainable lora_A / lora_B beside a frozen QuantLinear, as a PEFT LoRA layer.

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling        (per active adapter)

Several adapters can be loaded, switched and disabled like any PEFT LoRA. QA-LoRA (`use_qalora`) uses
PEFT's own variant: the input is mean-pooled per group of `qalora_group_size` channels before lora_A, which
is what lets `gptqlora merge` fold the adapter exactly into the quantized zeros.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

from gptqlora.kernels.dispatch import MAX_M
from gptqlora.kernels.quant_lora import CAST_CACHE_ENV, CastSlot, PackedBase, quant_lora_group
from gptqlora.nn.quant_linear import QuantLinear, compute_dtype
from gptqlora.nn.sibling_gemv import decode_group

MERGE_HINT = ("merging into packed GPTQ weights in place is not supported; use `gptqlora merge RUN_DIR "
              "--to fp16|gptq` (or --exact for QA-LoRA adapters)")


class GPTQLoraLinear(nn.Module, LoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("GPTQLoraLinear does not support DoRA")
        self._active_adapter = adapter_name
        self.siblings = None  # a SiblingGroup (adapters/siblings.py) when q/k/v or gate/up are fused
        # the LoRA weights cast to the compute dtype, kept between calls (kernels/quant_lora.py, LoraCast):
        # one slot for this layer's own calls, one for the sibling group's calls this layer leads
        self._cast_one, self._cast_group = CastSlot(), CastSlot()
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        limit = min(self.in_features, self.out_features)
        if r > limit:
            raise ValueError(f"LoRA rank r={r} is larger than this layer allows ({self.out_features}x"
                             f"{self.in_features}: at most {limit}); choose a smaller --lora_r")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        dtype = getattr(torch, getattr(config, "lora_dtype", "float32"))
        self.lora_A[adapter_name].to(dtype)
        self.lora_B[adapter_name].to(dtype)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> Optional[LoraVariant]:
        if config.use_qalora:
            from peft.tuners.lora.variants import QALoraLinearVariant

            return QALoraLinearVariant()
        return None

    def _plain_adapter(self, kwargs: dict) -> str | None:
        """The one active plain-LoRA adapter (no variant, dropout or none), if that is all this call uses."""
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return None
        active = [n for n in self.active_adapters if n in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        drop = self.lora_dropout[active[0]]
        return active[0] if isinstance(drop, (nn.Dropout, nn.Identity)) else None

    def _fused_adapter(self, kwargs: dict) -> str | None:
        """The one active plain-LoRA adapter when the fused base+LoRA function can compute this layer."""
        return self._plain_adapter(kwargs) if isinstance(self.base_layer, QuantLinear) else None

    def _small_m_other(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """Decoding on another packed base with a decode kernel that takes the adapter (SpQR's `small_m`): one
        launch for base and LoRA, as for QuantLinear; None where it does not apply."""
        small_m = getattr(self.base_layer, "small_m", None)  # it says None where it does not decode
        if small_m is None:
            return None
        name = self._plain_adapter(kwargs)
        if name is None or self._dropout_p(name):
            return None
        xc = x.to(compute_dtype(x))
        if self.siblings is not None and self.siblings.enabled:  # one launch for all, where the base has one
            y = self.siblings.output(self, x, lambda layers, _: _decode_other_group(layers, xc, name, kwargs))
            if y is not None:
                return y
        return small_m(xc, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def _fused_parts(self, name: str, p: float | None = None) -> tuple[PackedBase, torch.Tensor, torch.Tensor,
                                                                        float, float]:
        """This layer's share of a fused call: packed base, lora_A, lora_B, scaling, dropout p (`p` when the
        caller has it already)."""
        base = self.base_layer
        packed = PackedBase(base.qweight, base.zero_points, base.scales, base.g_idx, base.bits, base.kernel_plan())
        return (packed, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                self._dropout_p(name) if p is None else p)

    def _dropout_p(self, name: str) -> float:
        drop = self.lora_dropout[name]
        return drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(kwargs)
        if name is not None:  # one autograd function: base matmul, dropout and both LoRA matmuls
            base = self.base_layer
            p = self._dropout_p(name)
            xc = None  # x in the compute dtype, cast once, and only where a path below takes it
            if p == 0 and x.numel() <= MAX_M * x.shape[-1]:  # decoding (no gradient): one small-M kernel
                xc = x.to(compute_dtype(x))
                if self.siblings is not None and self.siblings.enabled:  # q|k|v, gate|up: one launch for all
                    y = self.siblings.output(self, x, lambda layers, _: _decode_group(layers, xc, name, kwargs))
                    if y is not None:
                        return y
                y = base.small_m(xc, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
                if y is not None:
                    return y
            y = None
            if self.siblings is not None and self.siblings.enabled:  # a sibling may hold this layer's output
                # keyed on x itself (the caller's tensor): a sibling whose output is held casts nothing
                y = self.siblings.output(self, x, lambda layers, x: _fused_group(
                    layers, x.to(compute_dtype(x)) if xc is None else xc, name, kwargs))
            if y is None:
                packed, a, b, s, _ = self._fused_parts(name, p)
                (y,) = quant_lora_group(x.to(compute_dtype(x)) if xc is None else xc, [packed], [a], [b], [s], p,
                                        base.kernel, cast_slot=_slot(self._cast_one))
            return y if base.bias is None else y + base.bias.to(y.dtype)
        y = self._small_m_other(x, kwargs)
        if y is not None:
            return y
        result = self.base_layer(x)  # (..., N) in the compute dtype
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            if name in self.lora_variant:  # QA-LoRA
                result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
            else:
                result = result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
        return result.to(out_dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's dense update [N, K] (nn.Linear orientation), fp32; QA-LoRA expanded per group."""
        gs = self.qalora_group_size[adapter] if adapter in self.lora_variant else None
        return lora_delta(self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], gs)

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError(MERGE_HINT)

    def unmerge(self, *args, **kwargs) -> None:
        raise NotImplementedError(MERGE_HINT)

    def __repr__(self) -> str:
        return "gptqlora." + super().__repr__()


def _decode_group(layers: list[GPTQLoraLinear], x: torch.Tensor, name: str, kwargs: dict,
                  kind: type = QuantLinear, group=decode_group):
    """All siblings' decode outputs from one small-M launch (`group`: nn/sibling_gemv.py's for QuantLinear
    bases, else the base type's own), or None when they can't share one (another base type, another adapter
    or dropout on one of them, scalings or ranks that differ)."""
    if any(not isinstance(m.base_layer, kind) or m._plain_adapter(kwargs) != name or m._dropout_p(name)
           for m in layers):
        return None
    scalings = {m.scaling[name] for m in layers}
    if len(scalings) != 1:
        return None
    return group([m.base_layer for m in layers], x, [m.lora_A[name].weight for m in layers],
                 [m.lora_B[name].weight for m in layers], scalings.pop())


def _decode_other_group(layers: list[GPTQLoraLinear], x: torch.Tensor, name: str, kwargs: dict):
    """`_decode_group` through the base type's `decode_group` (SpQR's: nn/spqr_siblings.py); None where the
    type has none."""
    kind = type(layers[0].base_layer)
    group = getattr(kind, "decode_group", None)
    return None if group is None else _decode_group(layers, x, name, kwargs, kind, group)


def _fused_group(layers: list[GPTQLoraLinear], x: torch.Tensor, name: str, kwargs: dict):
    """All siblings' outputs from one fused call on x (already in the compute dtype), or None when they
    can't share one now (another adapter active on one of them, different dropout or backend)."""
    if any(m._fused_adapter(kwargs) != name for m in layers):
        return None
    parts = [m._fused_parts(name) for m in layers]
    kernel = layers[0].base_layer.kernel
    p = parts[0][4]
    if any(q[4] != p for q in parts) or any(m.base_layer.kernel != kernel for m in layers):
        return None
    packed, a, b, s, _ = zip(*parts)
    return quant_lora_group(x, list(packed), list(a), list(b), list(s), p, kernel,
                            cast_slot=_slot(layers[0]._cast_group))


def _slot(slot: CastSlot) -> CastSlot | None:
    """The layer's cast slot, or None when GPTQLORA_LORA_CAST_CACHE=0 (cast on every call, for A/B runs)."""
    return None if os.environ.get(CAST_CACHE_ENV) == "0" else slot


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, qalora_group_size: int | None = None) -> torch.Tensor:
    """B·A·scaling as a dense [N, K] fp32 update. A is (r, K), or (r, K/group) for QA-LoRA, whose pooled
    input (mean over a group, times the number of groups) becomes a per-channel weight of pooled/group."""
    a, b = a.float(), b.float()
    if qalora_group_size:
        a = expand_qalora_a(a, qalora_group_size)
    return (b @ a) * scaling


def expand_qalora_a(a: torch.Tensor, group_size: int) -> torch.Tensor:
    """QA-LoRA's pooled lora_A (r, K/group) as the equivalent plain lora_A (r, K), fp32."""
    pooled = a.shape[1]
    return a.float().repeat_interleave(group_size, dim=1) * (pooled / group_size)
