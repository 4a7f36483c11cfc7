"""Batched decode (M = 2..16 tokens) GPTQ matmul with LoRA fused, for rows in group order and 2/4/8-bit codes:

    y = x @ dequant(W) + s * (x @ Aᵀ) @ Bᵀ        x (M, K), W (K, N) packed, A (r, K), B (N, r), y (M, N)

`gemv.py`'s kernel computes the same function (and everything this one does not take: 3 bit, any g_idx,
SpQR); `gemv_triton` runs this one when its config says PLACE = 4, and `gemv_reference` is the ground truth
of both. Why a second kernel: measured at M = 8 (H200, call 7), gemv.py's tensor-core path ran at 0.40-0.43x
the bf16 `x @ W`, three times slower than its own M = 1 path. It builds the (BK, BN) operand of its dot
from a (BK/PER, PER, BN) tile of unpacked codes by a reshape, which interleaves rows across the layout, and
it loops over 2-4 tiles per program, each waiting one DRAM round trip (register loads are not pipelined).

Here the K-sum of a tile is split by the code's place in its word: packed word row w holds rows w*PER + j,
j = 0..PER-1, so

    Σ_k x_k w_k = Σ_j  x[:, rows_j] @ W_j        W_j (BKW, BN): code j of every word, dequantized

PER dots of depth BKW = BK/PER (>= 16), each operand made from the words tile by a shift and a mask in its
own layout: no reshape. Each word row reads its own group's scales and zeros (PER rows lie in one group),
so a tile may span groups and a program's whole K-range can be one tile (all loads in flight at once).
W_j is rounded to x's dtype, as the training path's dense W is; the dots accumulate in fp32. Split-K ends
as in gemv.py (split_k.py's `_store_split`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gptqlora.kernels.gemv1 import _group_stats
from gptqlora.kernels.split_k import _store_split


@triton.jit(do_not_specialize=["M", "SPLIT"])
def _gemv_dot_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, perm_ptr, a_ptr, b_ptr, out_ptr, part_ptr,
                     lock_ptr, M, K, N, R, GROUP, lora_scale, SPLIT, BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
                     HAS_PERM: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_K: tl.constexpr, BM: tl.constexpr,
                     BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, F32_DOT: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // PER
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mm, mn = offs_m < M, offs_n < N
    span = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK  # rows per split, whole tiles
    k_start = pid_k * span
    k_end = tl.minimum(K, k_start + span)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), tl.float32)
    offs_r = tl.arange(0, BR)
    mr = offs_r < R
    xa = tl.zeros((BM, BR), tl.float32)
    for k0 in range(k_start, k_end, BK):  # the tuned configs make this one iteration (BK = span)
        w_rows = k0 // PER + tl.arange(0, BKW)  # (BKW,)
        mw = (w_rows < k_end // PER)[:, None] & mn[None, :]
        words = tl.load(qweight_ptr + w_rows[:, None] * N + offs_n[None, :], mask=mw, other=0).to(tl.uint32,
                                                                                                  bitcast=True)
        s, z = _group_stats(scales_ptr, zeros_ptr, (w_rows * PER // GROUP)[:, None], offs_n[None, :], mw, N, BITS,
                            FLOAT_ZEROS)  # (BKW, BN) each word row its group's
        for j in tl.static_range(PER):
            rows = w_rows * PER + j  # (BKW,) the rows code j of each word holds
            src = tl.load(perm_ptr + rows, mask=rows < k_end, other=0) if HAS_PERM else rows
            xj = tl.load(x_ptr + offs_m[:, None] * K + src[None, :], mask=mm[:, None] & (rows < k_end)[None, :],
                         other=0)  # (BM, BKW)
            q = ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            wj = ((q - z) * s).to(dt)  # (BKW, BN), rounded as the dense W of the training path
            if F32_DOT:  # Triton's interpreter gets bf16 dots wrong; the same exact products in fp32
                acc += tl.dot(xj.to(tl.float32), wj.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(xj, wj)
        if HAS_LORA:  # rows in x's own order (the splits partition K either way); A read contiguously
            offs_k = k0 + tl.arange(0, BK)
            mk = offs_k < k_end
            xl = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0)
            at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=mk[:, None] & mr[None, :], other=0)
            if F32_DOT:
                xa += tl.dot(xl.to(tl.float32), at.to(dt).to(tl.float32), input_precision="ieee")
            else:
                xa += tl.dot(xl, at.to(dt))  # (BM, BR); A in x's dtype as in training
    if HAS_LORA:
        bt = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None], mask=mr[:, None] & mn[None, :], other=0)
        if F32_DOT:
            acc += lora_scale * tl.dot(xa.to(dt).to(tl.float32), bt.to(dt).to(tl.float32), input_precision="ieee")
        else:
            acc += lora_scale * tl.dot(xa.to(dt), bt.to(dt))  # (BM, BN)
    _store_split(acc, out_ptr, part_ptr, lock_ptr, pid_n, pid_k, offs_m, offs_n, mm[:, None] & mn[None, :], M, N,
                 SPLIT, SPLIT_K, BM, BN)
