"""Autograd glue: y = x @ dequant(W) with a gradient to x only.

The packed weight is frozen. Letting autograd record `x @ W` would keep the dense W alive for backward
(a whole fp16 copy of the model during training); this Function keeps only references to the packed
buffers and dequantizes again in backward.
"""

from __future__ import annotations

import torch

from gptqlora.kernels.reference import dequantize


class QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, g_idx, bits: int):
        ctx.bits = bits
        ctx.save_for_backward(qweight, qzeros, scales, g_idx)
        return x @ dequantize(qweight, qzeros, scales, g_idx, bits, x.dtype)  # (..., N)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight, qzeros, scales, g_idx = ctx.saved_tensors
            w = dequantize(qweight, qzeros, scales, g_idx, ctx.bits, grad_out.dtype)  # (K, N)
            grad_x = grad_out @ w.t()  # (..., K)
        return grad_x, None, None, None, None, None


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Differentiable in x; uses the torch reference (fused kernels plug in here)."""
    return QuantMatmul.apply(x, qweight, qzeros, scales, g_idx, bits)
