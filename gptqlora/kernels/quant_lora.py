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

import contextlib
from typing import NamedTuple

import torch

from gptqlora.kernels import reference
from gptqlora.kernels.dispatch import resolve

CAST_CACHE_ENV = "GPTQLORA_LORA_CAST_CACHE"  # "0": cast the LoRA weights on every call (for comparison)


class PackedBase(NamedTuple):
    """One frozen packed layer as the fused function takes it (the QuantLinear buffers and its plan). A
    named tuple, not a dataclass: one is built per layer per call, and a tuple is built in a fraction of a
    frozen dataclass's time."""

    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    plan: object = None

    def dense(self, dtype: torch.dtype, backend: str) -> torch.Tensor:
        """Dense W (K, N); `backend` already resolved ("triton" or "torch"), so no second resolve here."""
        if backend == "triton":
            dequant = _triton()[0]
            if torch.compiler.is_compiling():  # the Triton launch as one opaque op in the compiled graph
                return dequant.dequantize_op(self.qweight, self.zeros, self.scales, self.g_idx, self.bits, dtype,
                                             self.plan)
            return dequant.dequantize_triton(self.qweight, self.zeros, self.scales, self.g_idx, self.bits, dtype,
                                             plan=self.plan)
        return reference.dequantize(self.qweight, self.zeros, self.scales, self.g_idx, self.bits, dtype)


def _triton():
    """The Triton kernel modules (dequant, lora_dropout), imported at first use: triton is optional off the
    GPU. Importing them also registers their ops (gptqlora::dequantize, dropout_xa, ...). After the first
    call the import is a lookup in sys.modules (no functools.cache: torch.compile warns about cached
    functions it traces)."""
    from gptqlora.kernels import dequant, lora_dropout

    return dequant, lora_dropout


# --- the LoRA weights in the compute dtype, cast once per optimizer step -------------------------------
# Under autocast the LoRA weights are fp32 and the products run in bf16/fp16: the cast copies (and B scaled
# for the backward) are the same tensors at every call of one training step (forward, and the
# recomputation under checkpointing), so a layer keeps them in a CastSlot. A backward through them drops
# them (an optimizer step comes next; an optimizer that writes through raw pointers, such as
# bitsandbytes' paged 8-bit AdamW, bumps no version counter, so the version alone can't tell), and any
# other change is seen by the Parameter object, storage or version counter differing (in-place writes
# through autograd's view of a weight: load_state_dict, nn.init). So a step casts once in its forward,
# reuses it in the recomputation and backward, and eval between steps casts once. The gradients are
# unaffected: computed against the cast copies and returned to the fp32 parameters, as without the cache.
# The copies are new tensors each time, never written in place, so a graph that saved older ones keeps them.

class LoraCast:
    """The cast LoRA weights of one fused call: a = [A_1; A_2; ...] (R, K), b_i (N_i, r_i), b_iᵀ, s_i * b_i,
    all in the compute dtype, and each layer's rank (its columns of xa)."""

    __slots__ = ("src", "dtype", "scalings", "inference", "a", "b", "bt", "_bs", "rs", "dtypes")

    def __init__(self, lora_a, lora_b, scalings, dtype: torch.dtype, keep: bool = True) -> None:
        """`keep`: record what the copies were made from, for `fresh` (not under torch.compile, whose graph
        casts at every call and which can trace neither data pointers nor inference mode)."""
        ts = (*lora_a, *lora_b)
        self.src = tuple((t, t._version, t.data_ptr()) for t in ts) if keep else ()
        self.dtype, self.scalings = dtype, scalings
        self.inference = torch.is_inference_mode_enabled() if keep else False  # copies are inference tensors
        self.a = lora_a[0].to(dtype).contiguous() if len(lora_a) == 1 else torch.cat(lora_a).to(dtype)
        self.b = [t.to(dtype) for t in lora_b]  # (N_i, r_i)
        self.bt = [t.t() for t in self.b]  # (r_i, N_i) views, for the forward's addmm
        self._bs = None
        self.rs = [t.shape[1] for t in lora_b]  # r_i: each layer's columns of xa
        self.dtypes = [t.dtype for t in lora_a], [t.dtype for t in lora_b]  # the gradients' dtypes

    @property
    def bs(self) -> list[torch.Tensor]:
        """s_i * B_i (N_i, r_i) for the backward, made at the first backward that needs it (none in eval)."""
        if self._bs is None:
            self._bs = [t * s for t, s in zip(self.b, self.scalings)]
        return self._bs

    def fresh(self, lora_a, lora_b, scalings, dtype: torch.dtype) -> bool:
        if self.inference and not torch.is_inference_mode_enabled():
            return False  # inference tensors can't be saved for a backward
        if self.dtype != dtype or self.scalings != scalings or \
                len(self.src) != len(lora_a) + len(lora_b):
            return False
        for t, (s, v, p) in zip((*lora_a, *lora_b), self.src):
            if t is not s or t._version != v or t.data_ptr() != p:
                return False
        return True


class CastSlot:
    """Where a layer (or a sibling group) keeps its LoraCast between calls. Not a module, no state dict."""

    __slots__ = ("cast",)

    def __init__(self) -> None:
        self.cast = None


def lora_cast(lora_a, lora_b, scalings, dtype: torch.dtype, slot: CastSlot | None) -> LoraCast:
    """The cast weights: the slot's when still fresh, else made now (and kept when there is a slot)."""
    if slot is None:
        return LoraCast(lora_a, lora_b, scalings, dtype)
    c = slot.cast
    if c is None or not c.fresh(lora_a, lora_b, scalings, dtype):
        c = slot.cast = LoraCast(lora_a, lora_b, scalings, dtype)
    return c


# --- c += alpha * a @ b, in place also inside a compiled graph --------------------------------------------
# Traced by torch.compile, `c.addmm_(a, b)` is functionalized into an out-of-place `addmm(c, a, b)`, which
# copies all of c into a new buffer before the matmul adds into it (H200, gptq2 7B at 16x256, compiled
# blocks: 1,088 device copies of 32-86 MB, 12.8 ms of a 400 ms step; bench/train_step.py --copy-sources).
# As a custom op that declares its mutation, the graph keeps it in place: inductor re-inplaces a mutating
# custom op whose input has no later reader, as it does for the dropout kernels' add_dropout_dx.

@torch.library.custom_op("gptqlora::addmm_", mutates_args=("c",))
def _addmm_op(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    c.addmm_(a, b, alpha=alpha)


@_addmm_op.register_fake
def _(c, a, b, alpha=1.0):
    return None


def addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """c += alpha * a @ b in place, returns c; through the custom op when traced (see above)."""
    if torch.compiler.is_compiling():
        torch.ops.gptqlora.addmm_(c, a, b, alpha)
        return c
    return c.addmm_(a, b, alpha=alpha)


def _no_autocast(device_type: str, dtype: torch.dtype):
    """Autocast off around the products, unless it would change nothing (off already, or on in the operands'
    own dtype: every operand is in `dtype`), which saves building a torch.autocast per call."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != dtype:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class QuantLoraMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bases, scalings, dropout: float, backend: str, slot, *ab):
        n = len(bases)
        dt = x.dtype  # the compute dtype: the caller has already cast x (autocast's dtype on GPU)
        shape = x.shape
        backend = resolve(backend, x.device)  # once: "triton" or "torch"; backward reuses it
        x = x.reshape(-1, shape[-1])  # (T, K)
        # Under torch.compile this body is traced into the graph: nothing outside it may be written (no
        # cast slot, no objects on ctx but constants and the packed bases), and the dropout seed is a CPU
        # tensor drawn in the graph, the kernels called as registered ops (kernels/lora_dropout.py).
        traced = torch.compiler.is_compiling()
        if traced:
            cast, slot = LoraCast(ab[:n], ab[n:], scalings, dt, keep=False), None
        else:
            cast = lora_cast(ab[:n], ab[n:], scalings, dt, slot)  # a (R, K), R = Σ r_i; b_i (N_i, r_i)
        a = cast.a
        with _no_autocast(x.device.type, dt):
            ys = []
            for base in bases:
                w = base.dense(dt, backend)  # (K, N_i), freed after its matmul
                ys.append(x @ w)  # (T, N_i)
                del w
            mask = seed = None
            seeded = dropout > 0 and backend == "triton"
            if seeded:  # mask from a seed, never stored
                xd = x = x.contiguous()
                lora_dropout = _triton()[1]
                if traced:  # the seed is saved in the mask's place
                    mask = seed_t = torch.randint(0, 2**31 - 1, (1,))
                    xa = torch.ops.gptqlora.dropout_xa(x, a, dropout, seed_t)  # (T, R)
                else:
                    seed = int(torch.randint(0, 2**31 - 1, (1,)))  # CPU generator: no device sync
                    xa = lora_dropout.dropout_xa(x, a, dropout, seed)  # (T, R)
            else:
                xd, mask = torch.native_dropout(x, dropout, True) if dropout > 0 else (x, None)
                xa = xd @ a.t()  # (T, R)
            xas = (xa,) if n == 1 else xa.split(cast.rs, dim=1)  # (T, r_i) views
            for y, xai, bti, s in zip(ys, xas, cast.bt, scalings):
                addmm_(y, xai, bti, s)  # y_i += s_i * xa_i @ B_iᵀ
        ctx.bases, ctx.scalings, ctx.dropout, ctx.backend, ctx.shape, ctx.seed = \
            bases, scalings, dropout, backend, shape, seed
        ctx.seed_saved = traced and seeded  # the seed tensor is in mask's slot
        ctx.rs, ctx.dtypes = cast.rs, cast.dtypes
        ctx.cast, ctx.slot = None if traced else cast, slot  # slot is None when traced
        ctx.save_for_backward(xd, mask, xa, a, *cast.b)  # a, b: the cast copies (kept: no second cast)
        if len(shape) == 2:
            return tuple(ys)
        return tuple(y.view(*shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        xd, mask, xa, a, *b = ctx.saved_tensors  # a, b in the compute dtype
        cast = ctx.cast
        if ctx.slot is not None and ctx.slot.cast is cast:
            ctx.slot.cast = None  # an optimizer step follows a backward: the next forward casts again
        n = len(b)
        dt = xd.dtype
        a_dtypes, b_dtypes = ctx.dtypes
        bs = cast.bs if cast is not None else [t * s for t, s in zip(b, ctx.scalings)]  # s_i * B_i
        dys = [g.reshape(-1, g.shape[-1]).to(dt) for g in grad_ys]  # (T, N_i)
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[6:6 + n], ctx.needs_input_grad[6 + n:]
        dx = None
        da, db = [None] * n, [None] * n
        with _no_autocast(xd.device.type, dt):
            parts = [dy @ bsi for dy, bsi in zip(dys, bs)]  # (T, r_i): gradient of xa_i
            dxa = parts[0] if n == 1 else torch.cat(parts, dim=1)  # (T, R)
            if any(need_b):
                xas = (xa,) if n == 1 else xa.split(ctx.rs, dim=1)
                for i, (xai, dy) in enumerate(zip(xas, dys)):
                    if need_b[i]:
                        db[i] = (dy.t() @ xai).mul_(ctx.scalings[i]).to(b_dtypes[i])  # (N_i, r_i)
            lora_dropout = _triton()[1] if ctx.seed is not None or ctx.seed_saved else None
            if any(need_a):
                if ctx.seed_saved:
                    da_all = torch.ops.gptqlora.dropout_da(dxa, xd, ctx.dropout, mask)  # (R, K) fp32
                elif ctx.seed is not None:  # xd is x here; the kernel applies the mask
                    da_all = lora_dropout.dropout_da(dxa, xd, ctx.dropout, ctx.seed)  # (R, K) fp32
                else:
                    da_all = dxa.t() @ xd  # (R, K)
                das = (da_all,) if n == 1 else da_all.split(ctx.rs, dim=0)
                da = [d.to(a_dtypes[i]) if need_a[i] else None for i, d in enumerate(das)]
            if need_x:
                for base, dy in zip(ctx.bases, dys):
                    w = base.dense(dt, ctx.backend)  # (K, N_i)
                    dx = dy @ w.t() if dx is None else addmm_(dx, dy, w.t())  # (T, K)
                    del w
                if ctx.seed_saved:
                    torch.ops.gptqlora.add_dropout_dx(dx, dxa, a, ctx.dropout, mask)
                elif ctx.seed is not None:
                    lora_dropout.add_dropout_dx(dx, dxa, a, ctx.dropout, ctx.seed)
                elif mask is None:
                    addmm_(dx, dxa, a)
                else:  # d drop(x) / dx = mask / (1 - p)
                    dx.add_((dxa @ a).mul_(mask), alpha=1.0 / (1.0 - ctx.dropout))
                if len(ctx.shape) != 2:
                    dx = dx.view(ctx.shape)
        return dx, None, None, None, None, None, *da, *db


def quant_lora_group(x: torch.Tensor, bases: list[PackedBase], lora_a: list[torch.Tensor],
                     lora_b: list[torch.Tensor], scalings: list[float], dropout: float = 0.0,
                     backend: str = "auto", cast_slot: CastSlot | None = None) -> tuple[torch.Tensor, ...]:
    """x (..., K) -> one (..., N_i) per layer, in x's dtype; differentiable in x and every lora_a (r_i, K),
    lora_b (N_i, r_i). The layers share x and the dropout mask (sibling projections of one input).

    `dropout` is the training-time dropout probability on the LoRA input (pass 0 in eval mode);
    `backend`: see dispatch.dequantize. `cast_slot`: where the caller keeps the LoRA weights cast to x's
    dtype between calls (made again after any change to them; see LoraCast); None casts them every call.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not len(bases) == len(lora_a) == len(lora_b) == len(scalings) >= 1:
        raise ValueError("quant_lora_group needs one base, lora_a, lora_b and scaling per layer")
    return QuantLoraMatmul.apply(x, tuple(bases), tuple(float(s) for s in scalings), float(dropout), backend,
                                 cast_slot, *lora_a, *lora_b)


def quant_lora_matmul(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, qweight: torch.Tensor,
                      zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int, scaling: float,
                      dropout: float = 0.0, backend: str = "auto", plan=None) -> torch.Tensor:
    """One layer: x (..., K) -> (..., N) in x's dtype; differentiable in x, lora_a (r, K) and lora_b (N, r).

    `plan`: the Triton dequantizer's row plan (kernels.dequant.plan_for), kept by the layer.
    """
    (y,) = quant_lora_group(x, [PackedBase(qweight, zeros, scales, g_idx, bits, plan)], [lora_a], [lora_b],
                            [scaling], dropout, backend)
    return y
