"""Autograd glue: y = x @ dequant(W) with a gradient to x only.

The packed weight is frozen. Letting autograd record `x @ W` would keep the dense W alive for backward
(a whole dense copy of the model during training); this Function keeps only references to the packed
buffers and dequantizes again in backward. The dense W of one layer exists only around one matmul.
"""

from __future__ import annotations

import torch

from gptqlora.kernels.dispatch import dequantize


class QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, zeros, scales, g_idx, bits: int, backend: str, plan):
        ctx.bits, ctx.backend, ctx.plan = bits, backend, plan
        ctx.save_for_backward(qweight, zeros, scales, g_idx)
        return x @ dequantize(qweight, zeros, scales, g_idx, bits, x.dtype, backend, plan)  # (..., N)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight, zeros, scales, g_idx = ctx.saved_tensors
            w = dequantize(qweight, zeros, scales, g_idx, ctx.bits, grad_out.dtype, ctx.backend, ctx.plan)
            grad_x = grad_out @ w.t()  # (..., K)
        return grad_x, None, None, None, None, None, None, None


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bits: int, backend: str = "auto", plan=None) -> torch.Tensor:
    """x (..., K) @ dequant(W) -> (..., N) in x's dtype, differentiable in x. `backend`, `plan`: see
    dispatch.dequantize."""
    return QuantMatmul.apply(x, qweight, zeros, scales, g_idx, bits, backend, plan)
