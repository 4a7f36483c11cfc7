"""Torch reference for GPTQ dequantization and matmul: works on any device, the ground truth for kernels."""

from __future__ import annotations

import torch

from gptqlora.formats.gptq import unpack_rows, unpack_zeros


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Packed GPTQ (v2 zeros) -> dense W [K, N] with W[i, o] = scales[g, o] * (q[i, o] - z[g, o]), g = g_idx[i].

    `qzeros` is the packed int32 [G, N*b/32] of true zeros, or float zeros [G, N] (an exact QA-LoRA merge
    moves zeros off the integers). Computed in fp32 and rounded once to `dtype` (default: the scales' dtype), so fp16 and bf16 results are
    the correctly rounded values of the exact product.
    """
    q = unpack_rows(qweight, bits)  # (K, N)
    z = unpack_zeros(qzeros, bits)  # (G, N)
    g = g_idx.long()
    w = (q.float() - z.float()[g]) * scales.float()[g]  # (K, N)
    return w.to(dtype or scales.dtype)
