"""One autograd function for frozen packed bases plus low-rank updates, for one layer or for sibling layers
that read the same input (q/k/v, gate/up):

    y_i = x @ dequant(W_i) + s_i * (drop(x) @ A_iᵀ) @ B_iᵀ      x (T, K), A_i (r_i, K), B_i (N_i, r_i), W_i (K, N_i)

Written out by hand instead of composing PEFT's modules (dropout, two nn.Linear, scale, add), because the
composition costs per layer: a dropout copy of x kept for lora_A's backward, a cast copy of x when the
LoRA weights are fp32, and a dozen small launches (forward, recompute and backward each). Here the
forward is, per layer, dequant and one matmul; then one dropout + thin matmul for all layers at once
(`xa = drop(x) @ [A_1; A_2; ...]ᵀ`, (T, Σr), computed once and reused for the B gradients) and a thin addmm
per layer; the backward adds the LoRA input gradient onto the bases' in place. Siblings share one autograd
node, one dropout mask and one pass over x for the LoRA part: at 1x2048 tokens a training step is bound by
the host's launch work, and q/k/v + gate/up as two groups take 7 layer calls down to 4.
Nothing but x and xa is kept: with dropout p on the Triton path the mask comes from a seed and is
regenerated in backward (kernels/lora_dropout.py); on the torch path drop(x) and the bool mask are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptqlora.kernels import lora_dropout
from gptqlora.kernels.dispatch import dequantize, resolve


@dataclass(frozen=True)
class PackedBase:
    """One frozen packed layer as the fused function takes it (the QuantLinear buffers and its plan)."""

    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    plan: object = None

    def dense(self, dtype: torch.dtype, backend: str) -> torch.Tensor:
        return dequantize(self.qweight, self.zeros, self.scales, self.g_idx, self.bits, dtype, backend, self.plan)


def _cat_rows(ts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return ts[0].to(dtype).contiguous() if len(ts) == 1 else torch.cat(ts).to(dtype)


class QuantLoraMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bases, scalings, dropout: float, backend: str, *ab):
        n = len(bases)
        lora_a, lora_b = ab[:n], ab[n:]
        dt = x.dtype  # the compute dtype: the caller has already cast x (autocast's dtype on GPU)
        shape = x.shape
        backend = resolve(backend, x.device)  # once: "triton" or "torch"; backward reuses it
        x = x.reshape(-1, shape[-1])  # (T, K)
        with torch.autocast(x.device.type, enabled=False):
            ys = []
            for base in bases:
                w = base.dense(dt, backend)  # (K, N_i), freed after its matmul
                ys.append(x @ w)  # (T, N_i)
                del w
            a = _cat_rows(lora_a, dt)  # (R, K), R = Σ r_i; kept for backward: no second cast there
            b = [t.to(dt) for t in lora_b]  # (N_i, r_i)
            mask = seed = None
            if dropout > 0 and backend == "triton":  # mask from a seed, never stored
                seed = int(torch.randint(0, 2**31 - 1, (1,)))  # CPU generator: no device sync
                xd = x = x.contiguous()
                xa = lora_dropout.dropout_xa(x, a, dropout, seed)  # (T, R)
            else:
                xd, mask = torch.native_dropout(x, dropout, True) if dropout > 0 else (x, None)
                xa = xd @ a.t()  # (T, R)
            cols = []
            off = 0
            for y, bi, s in zip(ys, b, scalings):
                r = bi.shape[1]
                cols.append((off, off + r))
                y.addmm_(xa[:, off:off + r], bi.t(), alpha=s)  # y_i += s_i * xa_i @ B_iᵀ
                off += r
        ctx.bases, ctx.scalings, ctx.dropout, ctx.backend, ctx.shape, ctx.seed, ctx.cols = \
            bases, scalings, dropout, backend, shape, seed, cols
        ctx.dtypes = [t.dtype for t in lora_a], [t.dtype for t in lora_b]  # the gradients' dtypes
        ctx.save_for_backward(xd, mask, xa, a, *b)
        return tuple(y.reshape(*shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        xd, mask, xa, a, *b = ctx.saved_tensors  # a, b in the compute dtype
        n = len(b)
        dt = xd.dtype
        a_dtypes, b_dtypes = ctx.dtypes
        dys = [g.reshape(-1, g.shape[-1]).to(dt) for g in grad_ys]  # (T, N_i)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[5:5 + n], ctx.needs_input_grad[5 + n:]
        dx = None
        da, db = [None] * n, [None] * n
        with torch.autocast(xd.device.type, enabled=False):
            parts = [dy @ (bi * s) for dy, bi, s in zip(dys, b, ctx.scalings)]  # (T, r_i): gradient of xa_i
            dxa = parts[0] if n == 1 else torch.cat(parts, dim=1)  # (T, R)
            for i, ((lo, hi), dy) in enumerate(zip(ctx.cols, dys)):
                if need_b[i]:
                    db[i] = (dy.t() @ xa[:, lo:hi]).mul_(ctx.scalings[i]).to(b_dtypes[i])  # (N_i, r_i)
            if any(need_a):
                if ctx.seed is not None:  # xd is x here; the kernel applies the mask
                    da_all = lora_dropout.dropout_da(dxa, xd, ctx.dropout, ctx.seed)  # (R, K) fp32
                else:
                    da_all = dxa.t() @ xd  # (R, K)
                da = [da_all[lo:hi].to(a_dtypes[i]) if need_a[i] else None for i, (lo, hi) in enumerate(ctx.cols)]
            if need_x:
                for base, dy in zip(ctx.bases, dys):
                    w = base.dense(dt, ctx.backend)  # (K, N_i)
                    dx = dy @ w.t() if dx is None else dx.addmm_(dy, w.t())  # (T, K)
                    del w
                if ctx.seed is not None:
                    lora_dropout.add_dropout_dx(dx, dxa, a, ctx.dropout, ctx.seed)
                elif mask is None:
                    dx.addmm_(dxa, a)
                else:  # d drop(x) / dx = mask / (1 - p)
                    dx.add_((dxa @ a).mul_(mask), alpha=1.0 / (1.0 - ctx.dropout))
                dx = dx.reshape(ctx.shape)
        return dx, None, None, None, None, *da, *db


def quant_lora_group(x: torch.Tensor, bases: list[PackedBase], lora_a: list[torch.Tensor],
                     lora_b: list[torch.Tensor], scalings: list[float], dropout: float = 0.0,
                     backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """x (..., K) -> one (..., N_i) per layer, in x's dtype; differentiable in x and every lora_a (r_i, K),
    lora_b (N_i, r_i). The layers share x and the dropout mask (sibling projections of one input).

    `dropout` is the training-time dropout probability on the LoRA input (pass 0 in eval mode);
    `backend`: see dispatch.dequantize.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not len(bases) == len(lora_a) == len(lora_b) == len(scalings) >= 1:
        raise ValueError("quant_lora_group needs one base, lora_a, lora_b and scaling per layer")
    return QuantLoraMatmul.apply(x, tuple(bases), tuple(float(s) for s in scalings), float(dropout), backend,
                                 *lora_a, *lora_b)


def quant_lora_matmul(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, qweight: torch.Tensor,
                      zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int, scaling: float,
                      dropout: float = 0.0, backend: str = "auto", plan=None) -> torch.Tensor:
    """One layer: x (..., K) -> (..., N) in x's dtype; differentiable in x, lora_a (r, K) and lora_b (N, r).

    `plan`: the Triton dequantizer's row plan (kernels.dequant.plan_for), kept by the layer.
    """
    (y,) = quant_lora_group(x, [PackedBase(qweight, zeros, scales, g_idx, bits, plan)], [lora_a], [lora_b],
                            [scaling], dropout, backend)
    return y
