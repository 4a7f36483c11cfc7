"""One-token decode (M = 1) GPTQ matmul with LoRA fused, for rows in group order and 2/4/8-bit codes:

    y = x @ dequant(W) + s * (x @ Aᵀ) @ Bᵀ        x (1, K), W (K, N) packed, A (r, K), B (N, r), y (1, N)

`gemv.py`'s kernel (the general one: M <= 16, any g_idx, 3 bit, SpQR) and this one compute the same
function; `gemv_triton` runs this one when its config says PLACE = 3, and `gemv_reference` is the ground
truth of both. Why a second kernel: at M = 1 the time is latency, not bytes or arithmetic (4096x4096 at
4 bit: ~3 us of bytes at the copy rate, 11.5 us measured). Loads into registers are not pipelined by
Triton's software pipeliner (it pipelines loads that feed shared memory), so every loop iteration of a
program waits one DRAM round trip; the tuned configs of gemv.py's kernel ran 2-3 tiles per program. Here a
tile may span several groups (MULTI: each packed word row reads its own group's scales and zeros, PER rows
of one group), so a program's whole K-range can be one tile: all its loads go out at once. The loop body
has no reduction across threads: partial sums stay per word row (BKW, BN) and are summed once at the end
(as is x @ Aᵀ).

Codes are read in place, the trick of gemv.py's `_place_value_dot` (one LOP3 + FADD + FFMA per code).
Split-K ends as in gemv.py (split_k.py's `_store_split`).

History (H200, bench/gemv_sweep.py): the first version of this file double-buffered tiles in registers
(one group per tile); it won 2 of the 6 M = 1 7B shapes in call 7 and none in call 10.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gptqlora.kernels.dequant import _zeros_at
from gptqlora.kernels.split_k import _store_split


@triton.jit
def _group_stats(scales_ptr, zeros_ptr, g, offs_n, mask, N, BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr):
    """Scales and zeros (fp32) of group(s) g at columns offs_n (any broadcastable shapes)."""
    s = tl.load(scales_ptr + g * N + offs_n, mask=mask, other=0).to(tl.float32)
    return s, _zeros_at(zeros_ptr, g, offs_n, mask, N, BITS, FLOAT_ZEROS)


@triton.jit(do_not_specialize=["SPLIT"])
def _gemv1_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, perm_ptr, a_ptr, b_ptr, out_ptr, part_ptr, lock_ptr,
                  K, N, R, GROUP, lora_scale, SPLIT, BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
                  HAS_PERM: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_K: tl.constexpr, BK: tl.constexpr,
                  BN: tl.constexpr, BR: tl.constexpr, MULTI: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PER // 2  # codes per 16-bit half-word
    BKW: tl.constexpr = BK // PER
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mn = offs_n < N
    span = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK  # rows per split, whole tiles
    k_start = pid_k * span
    k_end = tl.minimum(K, k_start + span)
    offs_r = tl.arange(0, BR)
    mr = offs_r < R
    acc2 = tl.zeros((BKW, BN), tl.float32)  # s (Σ_j x q - z Σ_j x) per word row, summed after the loop
    xa2 = tl.zeros((BK, BR), tl.float32)  # x_k A[:, k] per row k, summed after the loop
    for k0 in range(k_start, k_end, BK):  # the tuned configs make this one iteration (BK = span)
        w_rows = k0 // PER + tl.arange(0, BKW)  # (BKW,)
        mw = w_rows < k_end // PER
        words = tl.load(qweight_ptr + w_rows[:, None] * N + offs_n[None, :], mask=mw[:, None] & mn[None, :],
                        other=0).to(tl.uint32, bitcast=True)  # (BKW, BN)
        if MULTI:  # the tile spans groups: each word row its group's scales and zeros (PER rows, one group)
            g = (w_rows * PER) // GROUP
            s, z = _group_stats(scales_ptr, zeros_ptr, g[:, None], offs_n[None, :], mw[:, None] & mn[None, :], N,
                                BITS, FLOAT_ZEROS)  # (BKW, BN)
        else:  # the tile lies in one group
            s, z = _group_stats(scales_ptr, zeros_ptr, k0 // GROUP, offs_n, mn, N, BITS, FLOAT_ZEROS)
            s, z = s[None, :], z[None, :]
        p = tl.zeros((BKW, BN), tl.float32)
        xs = tl.zeros((BKW,), tl.float32)
        for h in tl.static_range(2):
            half = words >> 16 if h == 1 else words
            for j in tl.static_range(HALF):
                rows = k0 + tl.arange(0, BKW) * PER + h * HALF + j  # (BKW,)
                src = tl.load(perm_ptr + rows, mask=rows < k_end, other=0) if HAS_PERM else rows
                xv = tl.load(x_ptr + src, mask=rows < k_end, other=0).to(tl.float32)
                xs += xv
                # 2^23 + q * 2^(BITS*j), exact; x scaled by 2^-(BITS*j), exact
                f = ((half & (((1 << BITS) - 1) << (j * BITS))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                p += (xv * (2.0 ** (-BITS * j)))[:, None] * f
        acc2 += s * (p - xs[:, None] * z)
        if HAS_LORA:  # rows in x's own order (the splits partition K either way); A read contiguously
            offs_k = k0 + tl.arange(0, BK)
            mk = offs_k < k_end
            xl = tl.load(x_ptr + offs_k, mask=mk, other=0)
            at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=mk[:, None] & mr[None, :], other=0)
            xa2 += xl.to(tl.float32)[:, None] * at.to(xl.dtype).to(tl.float32)  # A in x's dtype as in training
    acc = tl.sum(acc2, axis=0)  # (BN,)
    if HAS_LORA:
        dt = x_ptr.dtype.element_ty
        xa = tl.sum(xa2, axis=0).to(dt).to(tl.float32)  # (BR,), rounded to x's dtype as the general kernel does
        bt = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None], mask=mr[:, None] & mn[None, :], other=0)
        acc += lora_scale * tl.sum(xa[:, None] * bt.to(dt).to(tl.float32), axis=0)
    _store_split(acc[None, :], out_ptr, part_ptr, lock_ptr, pid_n, pid_k, tl.arange(0, 1), offs_n, mn[None, :], 1, N,
                 SPLIT, SPLIT_K, 1, BN)
