"""Triton kernel: packed GPTQ (2/3/4/8 bit, v2 zeros, any g_idx) -> dense W [K, N] in fp16 or bf16.

Why dequantize-then-cuBLAS rather than a matmul that dequantizes inside its load of W: at training sizes
(thousands of tokens) the matmul is compute-bound and cuBLAS is near the card's peak, while writing and
re-reading a dense bf16 copy of one layer costs ~2 bytes per weight, i.e. microseconds per layer. The
dense W lives only for one matmul (the caching allocator reuses its block), so no model-sized copy and
no fp32/int64 temporaries ever exist. bench/kernels.py measures this choice against bf16 matmul.

The torch reference is `gptqlora.kernels.reference.dequantize`; both compute (q - z) * s in fp32 and
round once, so they agree bit for bit (tests/kernels/test_dequant.py).

Act-order needs no reordering: each row k reads its group g_idx[k] and gathers that group's scales and
zeros row (contiguous along N, so the gather is coalesced). 3-bit codes straddle 32-bit words (32 values
fill 3 words); the kernel reads the next word where a code crosses the boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _dequant_kernel(qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, out_ptr, K, N,
                    BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mk, mn = offs_k < K, offs_n < N
    m2 = mk[:, None] & mn[None, :]  # (BK, BN)

    bit_k = offs_k * BITS  # codes are packed along K: row k sits at bit BITS*k of column n's stream
    q = _unpack(qweight_ptr, (bit_k // 32)[:, None] * N + offs_n[None, :], (bit_k % 32)[:, None], N, m2,
                BITS)  # (BK, BN); the next word of a column's stream is one row down

    g = tl.load(g_idx_ptr + offs_k, mask=mk, other=0)[:, None]  # (BK, 1): group of each row
    s = tl.load(scales_ptr + g * N + offs_n[None, :], mask=m2, other=0).to(tl.float32)
    if FLOAT_ZEROS:  # [G, N] floats (exact QA-LoRA merges)
        z = tl.load(zeros_ptr + g * N + offs_n[None, :], mask=m2, other=0).to(tl.float32)
    else:  # packed along N: [G, N*BITS/32]
        bit_n = offs_n * BITS
        z = _unpack(zeros_ptr, g * (N * BITS // 32) + (bit_n // 32)[None, :], (bit_n % 32)[None, :], 1, m2,
                    BITS).to(tl.float32)  # the next word of a zeros row is one column right
    w = (q.to(tl.float32) - z) * s  # (BK, BN) in fp32, rounded once below
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=m2)


def dequantize_triton(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                      block_k: int = 32, block_n: int = 128, num_warps: int = 4) -> torch.Tensor:
    """Same contract as `reference.dequantize`: dense W [K, N] = scales[g] * (q - zeros[g]), g = g_idx[k].

    `zeros` is the packed int32 [G, N*b/32] of true zeros or float zeros [G, N]. `out` may be a
    preallocated [K, N] tensor to write into.
    """
    k, n = g_idx.shape[0], scales.shape[1]
    dtype = dtype or scales.dtype
    if out is None:
        out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](qweight, zeros, scales, g_idx, out, k, n, BITS=bits,
                          FLOAT_ZEROS=zeros.is_floating_point(), BLOCK_K=block_k, BLOCK_N=block_n,
                          num_warps=num_warps)
    return out
