"""Uniform affine quantization of weight groups, and round-to-nearest (RTN), the baseline solver.

Orientation: W is [N, K] as in nn.Linear (rows = output channels); groups run along K. Parameters are per
output channel: scale [N] (rounded to fp16, as stored) and an integer true zero [N] in [0, maxq].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantResult:
    """What a solver returns: codes and parameters in the GPTQ layout's orientation (not packed)."""

    codes: torch.Tensor  # int32 [K, N]
    scales: torch.Tensor  # fp16 [G, N]
    zeros: torch.Tensor  # int32 [G, N], true zeros
    g_idx: torch.Tensor  # int32 [K]
    error: float  # the solver's proxy loss (GPTQ) or squared weight error (RTN)

    def layer_kwargs(self) -> dict:
        """What the format's layer class takes in `from_codes` (besides group_size, bits, bias)."""
        return {"codes": self.codes, "scales": self.scales, "zeros": self.zeros, "g_idx": self.g_idx}

    def dequantize(self) -> torch.Tensor:
        """Dense W [N, K] (nn.Linear orientation), fp32."""
        g = self.g_idx.long()
        return ((self.codes.float() - self.zeros.float()[g]) * self.scales.float()[g]).t()


def find_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False, min_zero: int = 0, grid: int = 100,
                maxshrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of w [N, k]. The range always includes 0; `mse` searches shrunken ranges.

    `min_zero=1` keeps asymmetric zeros off 0, which the v1 checkpoint format cannot store.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(1).values.clamp(max=0)
    xmax = w.max(1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)

    def params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((hi - lo) / maxq).half().float().clamp(min=torch.finfo(torch.float16).tiny)
        if sym:
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            zero = torch.round(-lo / scale).clamp(min_zero, maxq)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse:
        best = torch.full_like(scale, math.inf)
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            s1, z1 = params(p * xmin, p * xmax)
            err = (dequant(quantize(w, s1, z1, maxq), s1, z1) - w).abs().pow(norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s1, scale), torch.where(better, z1, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes for w [N, k] (or [N]) with per-row scale/zero [N]."""
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if q.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return scale * (q - zero)


def group_starts(k: int, group_size: int) -> list[int]:
    gs = k if group_size == -1 else group_size
    return list(range(0, k, gs))


def rtn(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True,
        mse: bool = False, min_zero: int = 0) -> QuantResult:
    """Round-to-nearest per group: W [N, K] -> QuantResult."""
    w = weight.detach().float()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    maxq = 2**bits - 1
    codes, scales, zeros = [], [], []
    for s in group_starts(k, group_size):
        wg = w[:, s:s + gs]
        scale, zero = find_params(wg, bits, sym, mse, min_zero)
        codes.append(quantize(wg, scale, zero, maxq))
        scales.append(scale)
        zeros.append(zero)
    q = torch.cat(codes, 1)  # (N, K)
    res = QuantResult(
        codes=q.t().to(torch.int32).contiguous(),
        scales=torch.stack(scales).half(),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=(torch.arange(k) // gs).to(torch.int32),
        error=0.0,
    )
    res.error = float((res.dequantize() - w).pow(2).sum())
    return res


class RTN:
    """Round-to-nearest behind the solver protocol of `GPTQ` (it needs no calibration inputs)."""

    needs_inputs = False

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()

    def add_batch(self, inp: torch.Tensor) -> None:
        pass

    def quantize(self, bits: int, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                 static_groups: bool = False, damp: float = 0.01, mse: bool = False,
                 min_zero: int = 0, group_aware: bool = False) -> QuantResult:
        """RTN has no column order, no updates and no Hessian: desc_act, static_groups, damp and group_aware
        do not apply."""
        return rtn(self.weight, bits, group_size, sym, mse, min_zero)
