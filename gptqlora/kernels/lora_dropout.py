"""Triton kernels for LoRA's thin matmuls with the input dropout fused in, the mask never stored:

    xa  = drop(x) @ Aᵀ                   (T, r)   forward
    dA  = dxaᵀ @ drop(x)                 (r, K)   backward
    dx += (dxa @ A) * keep / (1 - p)     (T, K)   backward, in place on the base's input gradient

drop(x) = x * keep / (1 - p): the backward regenerates the forward's mask from a seed. The mask costs one
Philox call (`tl.randint4x`, four 32-bit words) per 8 elements: each 16-bit half decides one element, so p
is applied at a resolution of 2^-16 (p = 0.05 keeps 1 - 3277/65536). Masks come in blocks of 128 columns,
so every kernel tiles the columns by 128. Unfused, dropout costs per layer a pass that writes drop(x) and a byte
mask (both kept for backward) and, in backward, three more passes over a (T, K) tensor; here each kernel
reads x (or dx) once. No library fuses dropout into these products (PEFT composes nn.Dropout and two
nn.Linear; Unsloth's fast path requires dropout 0), hence our own. `dropout_mask` writes the same mask,
for tests. r is padded to 16 inside the kernels (the matrix units' smallest tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptqlora.kernels.launch import FastKernel, cdiv, next_power_of_2


@triton.jit
def _keep(seed, rows, u, K, thresh):
    """Keep mask (BT, 128) of rows `rows`, columns [128u, 128u + 128): a 16-bit random >= thresh."""
    c = tl.arange(0, 16)
    counter = (rows[:, None] * tl.cdiv(K, 128) + u) * 16 + c[None, :]  # (BT, 16): one Philox call each
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    lo = tl.join(tl.join(r0 & 0xFFFF, r1 & 0xFFFF), tl.join(r2 & 0xFFFF, r3 & 0xFFFF))
    hi = tl.join(tl.join(r0 >> 16, r1 >> 16), tl.join(r2 >> 16, r3 >> 16))
    return tl.reshape(tl.join(lo, hi), (rows.shape[0], 128)) >= thresh


@triton.jit
def _drop(x, seed, rows, u, K, thresh, scale):
    """x * keep / (1 - p) for a (BT, 128) tile at column block u, in x's dtype."""
    return tl.where(_keep(seed, rows, u, K, thresh), x * scale, 0.0).to(x.dtype)


@triton.jit
def _xa_kernel(x_ptr, a_ptr, xa_ptr, T, K, R, seed, thresh, scale,
               BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    r = tl.arange(0, R_PAD)
    mt, mr = rows < T, r < R
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for u in range(0, tl.cdiv(K, 128)):
        cols = u * 128 + tl.arange(0, 128)
        mk = cols < K
        offs = rows[:, None] * K + cols[None, :]  # (BT, 128)
        x = tl.load(x_ptr + offs, mask=mt[:, None] & mk[None, :], other=0.0)
        x = _drop(x, seed, rows, u, K, thresh, scale)
        a_t = tl.load(a_ptr + r[None, :] * K + cols[:, None], mask=mk[:, None] & mr[None, :], other=0.0)  # (BK, R)
        acc += tl.dot(x, a_t, input_precision=PRECISION)
    tl.store(xa_ptr + rows[:, None] * R + r[None, :], acc.to(xa_ptr.dtype.element_ty), mask=mt[:, None] & mr[None, :])


@triton.jit
def _da_kernel(dxa_ptr, x_ptr, part_ptr, T, K, R, rows_per_split, seed, thresh, scale,
               BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    u, pid_s = tl.program_id(0), tl.program_id(1)
    cols = u * 128 + tl.arange(0, 128)
    r = tl.arange(0, R_PAD)
    mk, mr = cols < K, r < R
    acc = tl.zeros((R_PAD, 128), dtype=tl.float32)
    t_lo = pid_s * rows_per_split
    for t0 in range(t_lo, tl.minimum(t_lo + rows_per_split, T), BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mt = rows < tl.minimum(t_lo + rows_per_split, T)
        offs = rows[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mt[:, None] & mk[None, :], other=0.0)
        x = _drop(x, seed, rows, u, K, thresh, scale)  # (BT, 128)
        dxa_t = tl.load(dxa_ptr + rows[None, :] * R + r[:, None], mask=mr[:, None] & mt[None, :], other=0.0)  # (R, BT)
        acc += tl.dot(dxa_t.to(x.dtype), x, input_precision=PRECISION)
    tl.store(part_ptr + pid_s * R * K + r[:, None] * K + cols[None, :], acc, mask=mr[:, None] & mk[None, :])


@triton.jit
def _dx_kernel(dx_ptr, dxa_ptr, a_ptr, T, K, R, seed, thresh, scale,
               BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    u = tl.program_id(1)
    cols = u * 128 + tl.arange(0, 128)
    r = tl.arange(0, R_PAD)
    mt, mk, mr = rows < T, cols < K, r < R
    dxa = tl.load(dxa_ptr + rows[:, None] * R + r[None, :], mask=mt[:, None] & mr[None, :], other=0.0)  # (BT, R)
    a = tl.load(a_ptr + r[:, None] * K + cols[None, :], mask=mr[:, None] & mk[None, :], other=0.0)  # (R, BK)
    offs = rows[:, None] * K + cols[None, :]
    m2 = mt[:, None] & mk[None, :]
    lora = tl.dot(dxa, a, input_precision=PRECISION)  # (BT, 128) fp32
    keep = _keep(seed, rows, u, K, thresh)
    dx = tl.load(dx_ptr + offs, mask=m2, other=0.0)
    out = dx.to(tl.float32) + tl.where(keep, lora * scale, 0.0)
    tl.store(dx_ptr + offs, out.to(dx_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _mask_kernel(out_ptr, T, K, seed, thresh, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    u = tl.program_id(1)
    cols = u * 128 + tl.arange(0, 128)
    m = (rows[:, None] < T) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], _keep(seed, rows, u, K, thresh), mask=m)


_XA, _DA, _DX, _MASK = map(FastKernel, (_xa_kernel, _da_kernel, _dx_kernel, _mask_kernel))


def _r_pad(r: int) -> int:
    return max(16, next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    """fp32 products in full precision (Triton's default for fp32 is tf32); half types are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(x: torch.Tensor) -> None:
    if x.numel() >= 2**31:
        raise ValueError(f"fused LoRA dropout indexes elements with int32; {tuple(x.shape)} is too large")


def _threshold(p: float) -> int:
    """p as a 16-bit threshold: an element is kept when its 16 random bits are >= this."""
    return min(65535, round(p * 65536))


def _rows_block(t: int) -> int:
    """Rows per program: enough programs (>= ~2 per multiprocessor) for small T, at most 64."""
    b = 16
    while b < 64 and t // (2 * b) >= 264:
        b *= 2
    return b


def dropout_xa(x: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """drop(x) @ aᵀ: x (T, K), a (r, K), both contiguous and of one dtype -> (T, r) in that dtype."""
    _check(x)
    t, k = x.shape
    r = a.shape[0]
    xa = torch.empty(t, r, dtype=x.dtype, device=x.device)
    bt = _rows_block(t)
    _XA[(cdiv(t, bt),)](x, a, xa, t, k, r, seed, _threshold(p), 1.0 / (1.0 - p), BLOCK_T=bt,
                                      R_PAD=_r_pad(r), PRECISION=_precision(x.dtype))
    return xa


def dropout_da(dxa: torch.Tensor, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dxaᵀ @ drop(x): dxa (T, r), x (T, K) -> (r, K) in fp32 (T is split across programs, partial sums
    added after)."""
    t, k = x.shape
    r = dxa.shape[1]
    n_u = cdiv(k, 128)
    splits = max(1, min(cdiv(t, 64), cdiv(264, n_u)))
    per = cdiv(cdiv(t, splits), 64) * 64
    splits = cdiv(t, per)
    # one split writes (r, K) directly (no `part[0]` view op per call)
    part = torch.empty((splits, r, k) if splits > 1 else (r, k), dtype=torch.float32, device=x.device)
    _DA[(n_u, splits)](dxa, x, part, t, k, r, per, seed, _threshold(p), 1.0 / (1.0 - p), BLOCK_T=64,
                       R_PAD=_r_pad(r), PRECISION=_precision(x.dtype))
    return part.sum(0) if splits > 1 else part


def add_dropout_dx(dx: torch.Tensor, dxa: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dx += (dxa @ a) * keep / (1 - p), in place: dx (T, K), dxa (T, r), a (r, K) in dx's dtype."""
    t, k = dx.shape
    r = a.shape[0]
    grid = (cdiv(t, 64), cdiv(k, 128))
    _DX[grid](dx, dxa, a, t, k, r, seed, _threshold(p), 1.0 / (1.0 - p), BLOCK_T=64, R_PAD=_r_pad(r),
                     PRECISION=_precision(dx.dtype))
    return dx


def dropout_mask(t: int, k: int, p: float, seed: int, device) -> torch.Tensor:
    """The keep mask (T, K) the kernels above use for this seed (for tests and references)."""
    out = torch.empty(t, k, dtype=torch.bool, device=device)
    _MASK[(cdiv(t, 16), cdiv(k, 128))](out, t, k, seed, _threshold(p), BLOCK_T=16)
    return out


# --- the same three kernels as registered ops, for compiled code -----------------------------------------
# Under torch.compile the seed is a CPU int64 tensor made inside the graph (a Python int drawn there would
# be fixed into the graph at trace time); reading it is a host read, no device sync. Opaque to Dynamo, so
# the compiled fused function keeps what the eager one keeps: x and xa, never a mask or a dropped copy of x.

@torch.library.custom_op("gptqlora::dropout_xa", mutates_args=())
def _dropout_xa_op(x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return dropout_xa(x, a, p, int(seed))


@_dropout_xa_op.register_fake
def _(x, a, p, seed):
    return x.new_empty((x.shape[0], a.shape[0]))


@torch.library.custom_op("gptqlora::dropout_da", mutates_args=())
def _dropout_da_op(dxa: torch.Tensor, x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return dropout_da(dxa, x, p, int(seed))


@_dropout_da_op.register_fake
def _(dxa, x, p, seed):
    return x.new_empty((dxa.shape[1], x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("gptqlora::add_dropout_dx", mutates_args=("dx",))
def _add_dropout_dx_op(dx: torch.Tensor, dxa: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor) -> None:
    add_dropout_dx(dx, dxa, a, p, int(seed))


@_add_dropout_dx_op.register_fake
def _(dx, dxa, a, p, seed):
    return None

