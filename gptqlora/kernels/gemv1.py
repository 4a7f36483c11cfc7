"""One-token (M = 1) GPTQ matvec with the LoRA update fused in, for 2/4/8-bit rows in group order:

    y = x @ dequant(W) + s * (x @ Aᵀ) @ Bᵀ        x (1, K), W (K, N) packed, A (r, K), B (N, r), y (1, N)

Why a kernel of its own beside gemv.py's: at M = 1 that kernel issues ~6 instructions per code (an SASS
count of its loop, offline sm_90 compile): a shift and a sign-extending mask per code, the codes reshaped
from (words, places, columns) to (rows, columns) through shared memory, and the product summed over the
rows of every tile (FMUL, then a tree of FADDs). Decoding is bound by that issue rate, not by the bytes
(docs/benchmarks.md, "Why the kernel is slow"). Here each code costs three instructions:

- no shift: a code at bit offset o of a word is masked in place and OR-ed into the mantissa of a float whose
  exponent makes the code's lowest bit the unit, 2^(23 - o); subtracting that power of two leaves the code,
  exactly (LOP3, FADD). Codes too high for the 23-bit mantissa come from the word shifted once;
- no reduction inside the loop: every thread accumulates its own (word row, column) cells with one FFMA per
  code and the group's scale and zero per word, s (Σ_j x_j q_j - z Σ_j x_j); the rows are summed once at the end.

Rows must be in group order (no act-order, or its repacked copy, `perm` giving each row's x column) and a
tile of BW words must lie in one group; gemv.py takes every other case (3 bit, odd groups, M > 1, SpQR).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from gptqlora.kernels.dequant import _zeros_at
from gptqlora.kernels.launch import FastKernel, cdiv, next_power_of_2
from gptqlora.kernels.split_k import _store_split


@triton.jit
def _code_at(words, J: tl.constexpr, BITS: tl.constexpr, WIN: tl.constexpr):
    """The code q at place J of each uint32 word, as the exact float m + q, m = 2^(23 - O): the word shifted
    left by SH (right if negative) brings the code to bit offset O in [23 - BITS - WIN, 23 - BITS] (runs of
    WIN // BITS + 1 places share one shift), where it is masked in place inside the mantissa of m, one LOP3. The caller subtracts Σ m x once per tile
    instead of m per code. O >= 23 - BITS - WIN keeps m <= 2^(BITS + WIN), which bounds what the products
    (m + q) x lose to that cancellation, worst for q = 1: with 16-bit x, BITS + WIN = 12 costs up to ~12 of
    fp32's 24 bits, below the rounding of an fp16 or bf16 y (tests/kernels/test_gemv1.py); fp32 x takes
    WIN = 0 (a shift per code, m <= 2^BITS)."""
    RUN: tl.constexpr = WIN // BITS + 1
    SH: tl.constexpr = 23 - BITS - ((J // RUN) * RUN + RUN - 1) * BITS  # the run's top place to 23 - BITS
    O: tl.constexpr = J * BITS + SH
    if SH > 0:
        src = words << SH
    elif SH < 0:
        src = words >> -SH
    else:
        src = words
    # one AND per code with one constant: the exponent bits are set once per shifted word (all of them,
    # 0x7F800000), and the AND keeps m's and the code's (the code's mantissa bits and m's exponent are disjoint)
    return ((src | 0x7F800000) & ((((1 << BITS) - 1) << O) | ((150 - O) << 23))).to(tl.float32, bitcast=True)


@triton.jit
def _magic(J: tl.constexpr, BITS: tl.constexpr, WIN: tl.constexpr):
    """m = 2^(23 - O) of place J (see `_code_at`)."""
    RUN: tl.constexpr = WIN // BITS + 1
    O: tl.constexpr = BITS * (J - (J // RUN) * RUN - RUN + 1) + 23 - BITS  # = J * BITS + SH of _code_at
    return 2.0 ** (23 - O)


@triton.jit(do_not_specialize=["SPLIT"])
def _gemv1_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, perm_ptr, a_ptr, b_ptr, out_ptr, part_ptr, lock_ptr,
                  K, N, R, GROUP, lora_scale, SPLIT, BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr,
                  HAS_PERM: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_K: tl.constexpr, BW: tl.constexpr,
                  BN: tl.constexpr, BR: tl.constexpr):
    PER: tl.constexpr = 32 // BITS  # codes per word: rows w * PER + j, j < PER
    WIN: tl.constexpr = max(0, 12 - BITS) if x_ptr.dtype.element_ty.primitive_bitwidth == 16 else 0  # _code_at
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mn = offs_n < N
    kw = K // PER
    span = tl.cdiv(tl.cdiv(kw, SPLIT), BW) * BW  # word rows per split, whole tiles
    w_start = pid_k * span
    w_end = tl.minimum(kw, w_start + span)
    acc = tl.zeros((BN,), tl.float32)
    offs_r = tl.arange(0, BR)
    mr = offs_r < R
    offs_k = tl.arange(0, BW * PER)
    xa = tl.zeros((BR, BW * PER), tl.float32)  # LoRA: x_k A[:, k], summed after the loop
    for w0 in range(w_start, w_end, BW):  # whole tiles: BW * PER divides the group, and the group K
        g = (w0 * PER) // GROUP  # the tile's one group
        s = tl.load(scales_ptr + g * N + offs_n, mask=mn, other=0).to(tl.float32)  # (BN,)
        z = _zeros_at(zeros_ptr, g, offs_n, mn, N, BITS, FLOAT_ZEROS)  # (BN,)
        p = tl.zeros((BN,), tl.float32)  # Σ_k (m_k + q_k) x_k over the tile's rows k
        xs = 0.0  # Σ_k x_k
        xm = 0.0  # Σ_k m_k x_k
        qrow = qweight_ptr + w0 * N + offs_n  # (BN,) pointers into the tile's first word row
        xrow = (perm_ptr if HAS_PERM else x_ptr) + w0 * PER  # the tile's first row: x, or its x column
        for w in tl.static_range(BW):
            words = tl.load(qrow + w * N, mask=mn, other=0).to(tl.uint32, bitcast=True)
            for j in tl.static_range(PER):  # one LOP3 and one FFMA per code
                if HAS_PERM:  # x column of row k
                    xj = tl.load(x_ptr + tl.load(xrow + (w * PER + j))).to(tl.float32)
                else:
                    xj = tl.load(xrow + (w * PER + j)).to(tl.float32)
                p += _code_at(words, j, BITS, WIN) * xj
                xs += xj
                xm += _magic(j, BITS, WIN) * xj
        acc += s * (p - (xm + xs * z))
        if HAS_LORA:  # over rows in x's own order: the splits' ranges still partition K, A read contiguously
            kk = w0 * PER + offs_k
            xl = tl.load(x_ptr + kk).to(tl.float32)
            at = tl.load(a_ptr + offs_r[:, None] * K + kk[None, :], mask=mr[:, None], other=0)
            xa += at.to(x_ptr.dtype.element_ty).to(tl.float32) * xl[None, :]  # A in x's dtype, as in training
    y = acc
    if HAS_LORA:  # + s (x_c Aᵀ_c) Bᵀ, one rank at a time: a (BR, BN) tile of B would spill at BN 512
        dt = x_ptr.dtype.element_ty
        xr = tl.sum(xa, axis=1).to(dt).to(tl.float32)  # (BR,), rounded to x's dtype as in training
        lo = tl.zeros((BN,), tl.float32)
        for r in tl.static_range(BR):
            mb = mn & (tl.full((BN,), r, tl.int32) < R)  # BR is R rounded up to a power of two
            b_r = tl.load(b_ptr + offs_n * R + r, mask=mb, other=0).to(dt).to(tl.float32)  # B[:, r]
            lo += tl.sum(tl.where(offs_r == r, xr, 0.0), axis=0) * b_r
        y += lora_scale * lo
    offs_m = tl.arange(0, 1)
    _store_split(y[None, :], out_ptr, part_ptr, lock_ptr, pid_n, pid_k, offs_m, offs_n, mn[None, :], 1, N, SPLIT,
                 SPLIT_K, 1, BN)


_launch = FastKernel(_gemv1_kernel)


def tile_words(k: int, bits: int, plan, bw: int) -> int:
    """The largest power of two <= bw of word rows per tile whose rows lie in one group and divide K (0: none:
    this kernel cannot take the layer)."""
    per = 32 // bits
    rows = math.gcd(plan.group, k)
    while bw and rows % (bw * per):
        bw //= 2
    return bw


def takes(m: int, k: int, bits: int, plan, spqr: bool) -> bool:
    """Whether this kernel serves the call: one token, 2/4/8 bit, rows in group order, whole-word tiles."""
    return (m == 1 and not spqr and bits in (2, 4, 8) and plan.sorted and tile_words(k, bits, plan, 1) > 0
            and os.environ.get("GPTQLORA_GEMV1", "1") != "0")


def heuristic_config(k: int, n: int, bits: int, plan, sms: int = 132) -> dict:
    """Untuned: 4 word rows per tile, 512 columns per one-warp program (16 per thread, so that each x value
    loaded serves 16 codes), split-K for ~4 programs per SM with >= 2 tiles each."""
    bw = tile_words(k, bits, plan, 4)
    tiles = k // (bw * (32 // bits))
    split = max(1, min(64, cdiv(4 * sms, cdiv(n, 512)), tiles // 2))
    return dict(BW=bw, BN=512, SPLIT=split, num_warps=1)


def legal_config(cfg: dict, k: int, bits: int, plan) -> dict:
    """cfg with BW cut to a tile the layer's groups allow and SPLIT to one that leaves every split rows."""
    cfg = dict(cfg)
    cfg["BW"] = bw = tile_words(k, bits, plan, cfg["BW"])
    kw = k // (32 // bits)
    split = max(1, min(cfg["SPLIT"], kw // bw))
    cfg["SPLIT"] = cdiv(kw, cdiv(cdiv(kw, split), bw) * bw)
    return cfg


def gemv1_triton(x: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, plan, cfg: dict,
                 lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                 scaling: float = 1.0) -> torch.Tensor:
    """x (1, K) -> (1, N) in x's dtype: x @ dequant(W) [+ scaling * (x @ Aᵀ) @ Bᵀ], W read through `plan`
    (gemv.plan_gemv: the layer's qweight, or an act-order layer's repacked copy with its `perm`); `cfg` a
    legal config (`legal_config`: BW, BN, SPLIT, num_warps)."""
    k = x.shape[1]
    n = plan.qweight.shape[1]
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    split = cfg["SPLIT"]
    part = torch.empty(split, 1, n, dtype=torch.float32, device=x.device) if split > 1 else out
    has_lora = lora_a is not None
    r = lora_a.shape[0] if has_lora else 1
    a = lora_a.contiguous() if has_lora else x
    b = lora_b.contiguous() if has_lora else x
    perm = plan.perm if plan.perm is not None else plan.locks  # unread without HAS_PERM
    grid = (cdiv(n, cfg["BN"]), split)
    _launch[grid](x, plan.qweight, zeros, scales, perm, a, b, out, part, plan.locks, k, n, r, plan.group,
                  float(scaling), split, BITS=bits, FLOAT_ZEROS=zeros.is_floating_point(),
                  HAS_PERM=plan.perm is not None, HAS_LORA=has_lora, SPLIT_K=split > 1, BW=cfg["BW"],
                  BN=cfg["BN"], BR=next_power_of_2(r), num_warps=cfg["num_warps"], num_stages=1)
    return out
