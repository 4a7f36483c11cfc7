"""Triton kernels: packed GPTQ (2/3/4/8 bit, v2 zeros, any g_idx) -> dense W [K, N] in fp16/bf16/fp32.

Why dequantize-then-cuBLAS rather than a matmul that dequantizes inside its load of W: at training sizes
(thousands of tokens) the matmul is compute-bound and cuBLAS runs near the card's peak, while writing and
re-reading a dense bf16 copy of one layer costs ~2 bytes per weight, i.e. tens of microseconds per layer.
The dense W lives only for one matmul (the caching allocator reuses its block), so no model-sized copy and
no fp32/int64 temporaries exist. bench/kernel_bench.py measures the choice against a bf16 matmul.

Two kernels, both computing (q - z) * s in fp32 and rounding once, as the torch reference
(`gptqlora.kernels.reference.dequantize`) does, so all three agree bit for bit:

- grouped (the fast one): walks the rows in group order, so a tile of BLOCK_K rows shares one group and
  loads its scales and zeros once per column instead of once per element. Act-order checkpoints need no
  repacking: `plan` holds the row permutation that sorts g_idx (computed once per layer), and each sorted
  row reads its codes from, and writes its values to, its original row. Needs the GPTQ structure: after
  sorting, group g holds rows [g*gs, (g+1)*gs).
- gather (any g_idx at all): every row reads its own group's scales and zeros.

3-bit codes straddle 32-bit words (32 values fill 3 words): `_unpack` reads the next word where a code
crosses the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gptqlora.kernels.launch import FastKernel, cdiv


@triton.jit
def _unpack(words_ptr, offset, shift, next_word, mask, BITS: tl.constexpr):
    """Codes at bit `shift` of the words at `offset` (a block of element offsets). A code that straddles
    into the following word (3 bit only) reads it at `offset + next_word`. Returns uint32 codes."""
    lo = tl.load(words_ptr + offset, mask=mask, other=0).to(tl.uint32, bitcast=True)
    v = lo >> shift.to(tl.uint32)
    if 32 % BITS != 0:
        straddle = (shift + BITS > 32) & mask
        hi = tl.load(words_ptr + offset + next_word, mask=straddle, other=0)
        hi = hi.to(tl.uint32, bitcast=True) << ((32 - shift) % 32).to(tl.uint32)
        v = v | tl.where(straddle, hi, 0)
    return v & ((1 << BITS) - 1)


@triton.jit
def _zeros_at(zeros_ptr, g, offs_n, mask, N, BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr):
    """Zero points of group(s) g at columns offs_n, as fp32: float [G, N], or packed along N [G, N*BITS/32]."""
    if FLOAT_ZEROS:
        return tl.load(zeros_ptr + g * N + offs_n, mask=mask, other=0).to(tl.float32)
    bit_n = offs_n * BITS
    # the next word of a packed zeros row is one column right
    return _unpack(zeros_ptr, g * (N * BITS // 32) + bit_n // 32, bit_n % 32, 1, mask, BITS).to(tl.float32)


@triton.jit
def _stat_at(code_ptr, step_ptr, base_ptr, g, offs_n, mask, N, SG, SBITS: tl.constexpr):
    """base + step * code (fp32) of group(s) g at columns offs_n: codes packed along N, step and base per
    second-level group of SG columns. The product is exact in fp32 (fp16 step, code < 2^8), as in torch."""
    bit_n = offs_n * SBITS
    code = _unpack(code_ptr, g * (N * SBITS // 32) + bit_n // 32, bit_n % 32, 1, mask, SBITS).to(tl.float32)
    s2 = g * (N // SG) + offs_n // SG
    step = tl.load(step_ptr + s2, mask=mask, other=0).to(tl.float32)
    base = tl.load(base_ptr + s2, mask=mask, other=0).to(tl.float32)
    return base + step * code


@triton.jit
def _dequant_grouped_kernel(qweight_ptr, zeros_ptr, scales_ptr, perm_ptr, out_ptr, K, N, GROUP,
                            BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    sorted_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,) rows in group order; one group per tile
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mk, mn = sorted_k < K, offs_n < N
    g = (pid_k * BLOCK_K) // GROUP
    s = tl.load(scales_ptr + g * N + offs_n, mask=mn, other=0).to(tl.float32)  # (BN,)
    z = _zeros_at(zeros_ptr, g, offs_n, mn, N, BITS, FLOAT_ZEROS)  # (BN,)
    k = tl.load(perm_ptr + sorted_k, mask=mk, other=0) if HAS_PERM else sorted_k  # original rows
    m2 = mk[:, None] & mn[None, :]
    bit_k = k * BITS  # codes are packed along K: row k sits at bit BITS*k of column n's stream
    q = _unpack(qweight_ptr, (bit_k // 32)[:, None] * N + offs_n[None, :], (bit_k % 32)[:, None], N, m2,
                BITS)  # (BK, BN); the next word of a column's stream is one row down
    w = (q.to(tl.float32) - z[None, :]) * s[None, :]  # fp32, rounded once below
    tl.store(out_ptr + k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _dequant_gather_kernel(qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, out_ptr, K, N,
                           BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mk, mn = offs_k < K, offs_n < N
    m2 = mk[:, None] & mn[None, :]  # (BK, BN)
    bit_k = offs_k * BITS
    q = _unpack(qweight_ptr, (bit_k // 32)[:, None] * N + offs_n[None, :], (bit_k % 32)[:, None], N, m2, BITS)
    g = tl.load(g_idx_ptr + offs_k, mask=mk, other=0)[:, None]  # (BK, 1): group of each row
    s = tl.load(scales_ptr + g * N + offs_n[None, :], mask=m2, other=0).to(tl.float32)
    z = _zeros_at(zeros_ptr, g, offs_n[None, :], m2, N, BITS, FLOAT_ZEROS)
    w = (q.to(tl.float32) - z) * s
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=m2)


_GROUPED, _GATHER = FastKernel(_dequant_grouped_kernel), FastKernel(_dequant_gather_kernel)


@dataclass(frozen=True)
class DequantPlan:
    """How the grouped kernel walks a layer: rows in group order (`perm`, None when g_idx is already
    sorted) with `group` rows per group. Built once per layer by `plan_for`."""

    perm: torch.Tensor | None
    group: int


def plan_for(g_idx: torch.Tensor, group_size: int) -> DequantPlan | None:
    """The grouped kernel's plan for this g_idx, or None if g_idx lacks the GPTQ group structure (then the
    gather kernel runs). One host sync; call once per layer and keep the result."""
    k = g_idx.shape[0]
    gs = k if group_size == -1 else group_size
    expected = torch.arange(k, device=g_idx.device, dtype=torch.int32) // gs
    g = g_idx.to(torch.int32)
    if torch.equal(g, expected):
        return DequantPlan(None, gs)
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], expected):
        return None
    return DequantPlan(perm.to(torch.int32), gs)


def _block_k(group: int) -> int:
    """Rows per tile: at most 16, and a divisor of the group so that no tile straddles two groups."""
    b = 16
    while group % b:
        b //= 2
    return b


def dequantize_triton(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                      plan: DequantPlan | None = None, block_k: int | None = None, block_n: int = 256,
                      num_warps: int = 4) -> torch.Tensor:
    """Same contract as `reference.dequantize`: dense W [K, N] = scales[g] * (q - zeros[g]), g = g_idx[k].

    `zeros` is the packed int32 [G, N*b/32] of true zeros or float zeros [G, N]; `out` a preallocated
    [K, N] to write into; `plan` (from `plan_for`) selects the grouped kernel, without it the gather kernel
    runs. Block sizes: measured on an H200 (bench/kernel_bench.py), 16 x 256 with 4 warps was fastest.
    """
    k, n = g_idx.shape[0], scales.shape[1]
    if out is None:
        out = torch.empty(k, n, dtype=dtype or scales.dtype, device=qweight.device)
    float_zeros = zeros.is_floating_point()
    if plan is not None:
        bk = block_k or _block_k(plan.group)
        perm = plan.perm if plan.perm is not None else g_idx  # any int32 pointer; unread without HAS_PERM
        grid = (cdiv(k, bk), cdiv(n, block_n))
        _GROUPED[grid](qweight, zeros, scales, perm, out, k, n, plan.group, BITS=bits,
                                      FLOAT_ZEROS=float_zeros, HAS_PERM=plan.perm is not None, BLOCK_K=bk,
                                      BLOCK_N=block_n, num_warps=num_warps)
    else:
        bk = block_k or 16
        grid = (cdiv(k, bk), cdiv(n, block_n))
        _GATHER[grid](qweight, zeros, scales, g_idx, out, k, n, BITS=bits, FLOAT_ZEROS=float_zeros,
                                     BLOCK_K=bk, BLOCK_N=block_n, num_warps=num_warps)
    return out


@torch.library.custom_op("gptqlora::dequantize", mutates_args=())
def _dequantize_op(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                   perm: torch.Tensor | None, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    # What torch.compile sees of the kernels: one opaque op (group 0: no plan, the gather kernel)
    plan = DequantPlan(perm, group) if group else None
    return dequantize_triton(qweight, zeros, scales, g_idx, bits, dtype, plan=plan)


@_dequantize_op.register_fake
def _(qweight, zeros, scales, g_idx, perm, bits, group, dtype):
    return scales.new_empty((g_idx.shape[0], scales.shape[1]), dtype=dtype)


def dequantize_op(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                  dtype: torch.dtype, plan: DequantPlan | None = None) -> torch.Tensor:
    """dequantize_triton through the registered op, for compiled code: Dynamo does not trace into the
    launcher (FastKernel's cache, Triton's binder) and inductor schedules the op like any other."""
    return torch.ops.gptqlora.dequantize(qweight, zeros, scales, g_idx, None if plan is None else plan.perm, bits,
                                        0 if plan is None else plan.group, dtype)
