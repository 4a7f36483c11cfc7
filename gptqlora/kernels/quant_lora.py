"""One autograd function for a frozen packed base plus a low-rank update:

    y = x @ dequant(W) + s * (drop(x) @ Aᵀ) @ Bᵀ          x (T, K), A (r, K), B (N, r), W (K, N)

Written out by hand instead of composing PEFT's modules (dropout, two nn.Linear, scale, add), because the
composition costs per layer: a dropout copy of x kept for lora_A's backward, a cast copy of x when the
LoRA weights are fp32, and a dozen small launches (forward, recompute and backward each). Here the
forward is dequant, one matmul, dropout, two thin matmuls fused into an addmm; `xa = drop(x) @ Aᵀ` (T, r)
is computed once and reused for B's gradient; the backward adds the LoRA input gradient onto the base's
in place. Nothing but x and xa is kept: with dropout p on the Triton path the mask comes from a seed and
is regenerated in backward (kernels/lora_dropout.py); on the torch path drop(x) and the bool mask are kept.
"""

from __future__ import annotations

import torch

from gptqlora.kernels import lora_dropout
from gptqlora.kernels.dispatch import dequantize, resolve


class QuantLoraMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, qweight, zeros, scales, g_idx, bits: int, scaling: float,
                dropout: float, backend: str, plan):
        dt = x.dtype  # the compute dtype: the caller has already cast x (autocast's dtype on GPU)
        shape = x.shape
        backend = resolve(backend, x.device)  # once: "triton" or "torch"; backward reuses it
        x = x.reshape(-1, shape[-1])  # (T, K)
        with torch.autocast(x.device.type, enabled=False):
            w = dequantize(qweight, zeros, scales, g_idx, bits, dt, backend, plan)  # (K, N)
            y = x @ w  # (T, N)
            del w
            a, b = lora_a.to(dt).contiguous(), lora_b.to(dt)  # kept for backward: no second cast there
            mask = seed = None
            if dropout > 0 and backend == "triton":  # mask from a seed, never stored
                seed = int(torch.randint(0, 2**31 - 1, (1,)))  # CPU generator: no device sync
                xd = x = x.contiguous()
                xa = lora_dropout.dropout_xa(x, a, dropout, seed)  # (T, r)
            else:
                xd, mask = torch.native_dropout(x, dropout, True) if dropout > 0 else (x, None)
                xa = xd @ a.t()  # (T, r)
            y.addmm_(xa, b.t(), alpha=scaling)  # y += s * xa @ Bᵀ
        ctx.bits, ctx.scaling, ctx.dropout, ctx.backend, ctx.plan, ctx.shape, ctx.seed = \
            bits, scaling, dropout, backend, plan, shape, seed
        ctx.dtypes = lora_a.dtype, lora_b.dtype  # the gradients' dtypes
        ctx.save_for_backward(xd, mask, xa, a, b, qweight, zeros, scales, g_idx)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        xd, mask, xa, a, b, qweight, zeros, scales, g_idx = ctx.saved_tensors  # a, b in the compute dtype
        dt, s = xd.dtype, ctx.scaling
        a_dtype, b_dtype = ctx.dtypes
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(dt)  # (T, N)
        dx = da = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dxa = dy @ (b * s)  # (T, r): gradient of xa
            if ctx.needs_input_grad[2]:
                db = (dy.t() @ xa).mul_(s).to(b_dtype)  # (N, r)
            if ctx.needs_input_grad[1]:
                if ctx.seed is not None:  # xd is x here; the kernel applies the mask
                    da = lora_dropout.dropout_da(dxa, xd, ctx.dropout, ctx.seed).to(a_dtype)
                else:
                    da = (dxa.t() @ xd).to(a_dtype)  # (r, K)
            if ctx.needs_input_grad[0]:
                w = dequantize(qweight, zeros, scales, g_idx, ctx.bits, dt, ctx.backend, ctx.plan)  # (K, N)
                dx = dy @ w.t()  # (T, K)
                del w
                if ctx.seed is not None:
                    lora_dropout.add_dropout_dx(dx, dxa, a, ctx.dropout, ctx.seed)
                elif mask is None:
                    dx.addmm_(dxa, a)
                else:  # d drop(x) / dx = mask / (1 - p)
                    dx.add_((dxa @ a).mul_(mask), alpha=1.0 / (1.0 - ctx.dropout))
                dx = dx.reshape(ctx.shape)
        return dx, da, db, None, None, None, None, None, None, None, None, None


def quant_lora_matmul(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, qweight: torch.Tensor,
                      zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int, scaling: float,
                      dropout: float = 0.0, backend: str = "auto", plan=None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; differentiable in x, lora_a (r, K) and lora_b (N, r).

    `dropout` is the training-time dropout probability on the LoRA input (pass 0 in eval mode);
    `backend`, `plan`: see dispatch.dequantize.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return QuantLoraMatmul.apply(x, lora_a, lora_b, qweight, zeros, scales, g_idx, bits, float(scaling),
                                 float(dropout), backend, plan)
