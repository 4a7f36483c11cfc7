"""One-token (M = 1) GPTQ matvec with the LoRA update fused in, for 2/4/8-bit rows in group order:

    y = x @ dequant(W) + s * (x @ Aᵀ) @ Bᵀ        x (1, K), W (K, N) packed, A (r, K), B (N, r), y (1, N)

Why a kernel of its own beside gemv.py's general one: an Nsight Compute run of that kernel at 4096x4096,
4 bit (session 12, docs/benchmarks.md) found it bound by instruction issue at too few warps: ~8 instructions
per code (a shift and a mask per code, the codes reshaped from (words, places, columns) to (rows, columns)
through shared memory, a reduction over the rows of every tile), 127 registers, so ~2 warps per scheduler
issuing 0.4 instructions a cycle. Here:

- a code costs one LOP3 and one FFMA: it is masked in place inside the mantissa of a float m = 2^(23 - O)
  whose exponent makes the code's lowest bit the unit (`_code_at`; runs of places share one shift of the
  word), and Σ m x is subtracted once per tile (session 8's trick, kernels/gemv1.py in the history);
- each thread accumulates its own (word row, column) cells and the rows are summed once at the end: no
  reshape and no reduction across threads inside the loop;
- the tile is (BW, NREP, 128): Triton puts a warp's 32 threads x 4 columns (16-byte loads) along the last
  axis and the warps along the first (its layout orders the two strided axes by index), so every thread
  holds one word row of NREP column blocks and each x value it loads (through `perm` for an act-order
  copy) serves 4 * NREP columns. Session 13 found the tile had been (NREP, BW, 128) with the warps on NREP:
  each thread then held all BW word rows of one block and loaded every x value BW times (offline sm_90
  SASS at NREP 4, BW 4, 4 warps: 838 instructions per loop iteration for 128 codes a thread, 625 now);
- split-K as gemv.py (split_k.py: fp32 partials, the last program of a column block sums them in a fixed
  order), and SPLIT 1 needs none.

Sibling projections (q|k|v, gate|up) side by side: `bounds` as in gemv.py, each column block reading its
own projection's A and B. 3-bit words (codes straddle words), groups no whole tile divides, the per-row
gather layout, SpQR and M > 1 stay with gemv.py.

The one-token default at 2 and 4 bit since session 14 (`GPTQLORA_GEMV_M1`: unset = that default, "split" =
gemv.py's kernel for every call, "inplace" = this kernel at 8 bit too, never measured there). History: on an
H100 (session 12, bench/gemv_m1_probe.py, the same graph-timed harness as gemv.py's sweep, r = 8 LoRA,
act-order) it ran at 0.96-0.99x gemv.py's speed per 7B layer at 4 bit and 1.05-1.15x at 2 bit, and a 7B
decoded at 4 bit at 219.0 tokens/s against 222.5 through gemv.py in the same call. With its warps on the
word rows (session 13) and the tuned entries of gemv_configs.json ("m1,..." keys; session 14, H100): per
layer 1.15-1.26x gemv.py at 2 bit and 0.92-1.10x at 4 bit; the 7B at batch 1, same call, 278.5 against 271.0
tokens/s at 2 bit and 282.2 against 238.6 at 4 bit (bf16 164.0). docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gptqlora.kernels.dequant import _zeros_at
from gptqlora.kernels.launch import FastKernel
from gptqlora.kernels.lora_u import projections, u_slots
from gptqlora.kernels.split_k import _store_split

ENV = "GPTQLORA_GEMV_M1"  # unset: one-token 2/4-bit calls take this kernel; "split": gemv.py's; "inplace": 8 bit too
U_ENV = "GPTQLORA_GEMV_LORA_U"  # "1": the adapter's u = x Aᵀ once per call (kernels/lora_u.py), u Bᵀ added by
#                                 split 0, instead of each program's share of u in its loop (session 17, unmeasured)
AHEAD_ENV = "GPTQLORA_L2_AHEAD"  # MB of the next launch's packed weight each call asks L2 for (0 or unset: none;
#   "8" = its first 8 MB, "all" = all of it). Off: on an H100 the 4-bit 7B gained 0.91x-1.22x, build by build
#   (session 25, docs/benchmarks.md). The next launch's weight is the `ahead` tensor a layer is given
#   (nn/decode_order.py links them in a model's launch order)
AHEAD_AT_ENV = "GPTQLORA_L2_AHEAD_AT"  # "end" (default): each program asks after its own words are in; "start"
AHEAD_LAST_ENV = "GPTQLORA_L2_AHEAD_LAST"  # "1" (default): ask with the evict_last hint; "0": plain
OWN_FIRST_ENV = "GPTQLORA_L2_OWN_FIRST"  # "1": this layer's own words read with evict_first (they are read once)
SELF_ENV = "GPTQLORA_L2_SELF"  # "1": each program asks L2 for all its own words before its loop (session 25, unmeasured)
L2_ENVS = (AHEAD_ENV, AHEAD_AT_ENV, AHEAD_LAST_ENV, OWN_FIRST_ENV, SELF_ENV)  # the L2 settings, in the benches' order
DEFAULT_BITS = (2, 4)  # where the 7B A/B measured it ahead (session 14); 8 bit unmeasured
TUNABLE = ("NREP", "BW", "SPLIT", "num_warps", "PREFETCH", "loop_stages")
COLS = 128  # columns of one block: a warp's 32 threads x 4 (one 16-byte load each); less only where siblings' widths need it


@triton.jit
def _code_at(words, J: tl.constexpr, BITS: tl.constexpr, WIN: tl.constexpr):
    """The code q at place J of each uint32 word as the exact float m + q, m = 2^(23 - O): the word shifted
    by SH brings the code to bit offset O in [23 - BITS - WIN, 23 - BITS] (runs of WIN // BITS + 1 places
    share one shift), where one AND keeps it inside the mantissa of m (the exponent bits are OR-ed in once
    per shifted word). m <= 2^(BITS + WIN) bounds what the caller's subtraction of Σ m x loses: with 16-bit x,
    BITS + WIN = 12 costs up to ~12 of fp32's 24 bits, under the rounding of a 16-bit y; fp32 x takes WIN 0."""
    RUN: tl.constexpr = WIN // BITS + 1
    SH: tl.constexpr = 23 - BITS - ((J // RUN) * RUN + RUN - 1) * BITS  # the run's top place to 23 - BITS
    O: tl.constexpr = J * BITS + SH
    if SH > 0:
        src = words << SH
    elif SH < 0:
        src = words >> -SH
    else:
        src = words
    return ((src | 0x7F800000) & ((((1 << BITS) - 1) << O) | ((150 - O) << 23))).to(tl.float32, bitcast=True)


@triton.jit
def _magic(J: tl.constexpr, BITS: tl.constexpr, WIN: tl.constexpr):
    """m = 2^(23 - O) of place J (see `_code_at`)."""
    RUN: tl.constexpr = WIN // BITS + 1
    O: tl.constexpr = BITS * (J - (J // RUN) * RUN - RUN + 1) + 23 - BITS  # = J * BITS + SH of _code_at
    return 2.0 ** (23 - O)


@triton.jit
def _prefetch_l2(ptrs, EVICT_LAST: tl.constexpr):
    """A PREFETCH to L2 of each address (fire and forget: nothing waits for it). Inline PTX: Triton has no
    prefetch of its own, and a load whose value is unused would be removed or waited for."""
    if EVICT_LAST:
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _l2_ahead(ahead_ptr, lines, PFB: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Asks L2 for this program's share of the first `lines` 128-byte lines at ahead_ptr (int32: 32 a line),
    PFB at a time, one per thread."""
    nprog = tl.num_programs(0) * tl.num_programs(1)
    share = tl.cdiv(lines, nprog)
    first = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * share
    last = tl.minimum(first + share, lines)
    for i in range(first, last, PFB):
        offs = i + tl.arange(0, PFB)
        offs = tl.where(offs < last, offs, last - 1).to(tl.int64) * 32  # past the share: its last line again
        _prefetch_l2(ahead_ptr + offs, EVICT_LAST)


@triton.jit
def _l2_self(qweight_ptr, w_start, w_end, col0, N, QW_STRIDE, BN: tl.constexpr, PFB: tl.constexpr):
    """Asks L2 for all of this program's own words (word rows [w_start, w_end), columns [col0, col0 + BN)) before
    its loop reads them tile by tile: every tile's lines in flight at once, each from the SM that will read it.
    A line is 32 words of a row; columns past N are clamped to the row's last line."""
    LPR: tl.constexpr = BN // 32  # lines a row
    total = (w_end - w_start) * LPR
    for i in range(0, total, PFB):
        idx = i + tl.arange(0, PFB)
        idx = tl.where(idx < total, idx, total - 1)
        col = tl.minimum(col0 + (idx % LPR) * 32, N - 1)
        _prefetch_l2(qweight_ptr + (w_start + idx // LPR).to(tl.int64) * QW_STRIDE + col, False)


@triton.jit(do_not_specialize=["SPLIT", "AHEAD_LINES"])
def _gemv_m1_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, perm_ptr, a_ptr, b_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr,
                    out_ptr, part_ptr, lock_ptr, ahead_ptr, K, N, N1, N2, QW_STRIDE, R, GROUP, lora_scale, SPLIT,
                    AHEAD_LINES, BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                    HAS_LORA: tl.constexpr, SPLIT_K: tl.constexpr, ONE_GROUP: tl.constexpr, BW: tl.constexpr,
                    NREP: tl.constexpr, COLS: tl.constexpr, BR: tl.constexpr, PREFETCH: tl.constexpr,
                    LOOP_STAGES: tl.constexpr, UPRE: tl.constexpr, AHEAD: tl.constexpr, PFB: tl.constexpr,
                    EVICT_LAST: tl.constexpr, OWN_FIRST: tl.constexpr, SELF_PF: tl.constexpr):
    PER: tl.constexpr = 32 // BITS  # codes per word: rows w * PER + j, j < PER
    WIN: tl.constexpr = max(0, 12 - BITS) if x_ptr.dtype.element_ty.primitive_bitwidth == 16 else 0
    BN: tl.constexpr = NREP * COLS
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n2 = pid_n * BN + tl.arange(0, NREP)[:, None] * COLS + tl.arange(0, COLS)[None, :]  # (NREP, COLS)
    mn2 = offs_n2 < N
    kw = K // PER
    span = tl.cdiv(tl.cdiv(kw, SPLIT), BW) * BW  # word rows per split, whole tiles
    w_start = pid_k * span
    w_end = tl.minimum(kw, w_start + span)
    offs_w = tl.arange(0, BW)
    acc = tl.zeros((BW, NREP, COLS), tl.float32)
    offs_r = tl.arange(0, BR)
    mr = offs_r < R
    offs_k = tl.arange(0, BW * PER)
    xa = tl.zeros((BR, BW * PER), tl.float32)  # LoRA: x_k A[:, k], summed after the loop
    # siblings side by side: columns [N1, N2) are the second projection (a1, b1), [N2, N) the third
    n_first = pid_n * BN
    n_off = N1 * 0
    if n_first >= N2:
        a_ptr, b_ptr, n_off = a2_ptr, b2_ptr, N2
    elif n_first >= N1:
        a_ptr, b_ptr, n_off = a1_ptr, b1_ptr, N1
    if SELF_PF:  # this program's own words asked of L2 at once (GPTQLORA_L2_SELF)
        _l2_self(qweight_ptr, w_start, w_end, pid_n * BN, N, QW_STRIDE, BN, PFB)
    if AHEAD == 1:  # the next launch's weights asked of L2 before this program's own (see ahead_config)
        _l2_ahead(ahead_ptr, AHEAD_LINES, PFB, EVICT_LAST)
    OWN: tl.constexpr = "evict_first" if OWN_FIRST else ""  # this layer's words: read once, let them go first
    if PREFETCH:  # the first tile's words here, each next tile's before the current one is computed
        mw0 = (w_start + offs_w) < w_end
        nxt = tl.load(qweight_ptr + (w_start + offs_w)[:, None, None] * QW_STRIDE + offs_n2[None, :, :],
                      mask=mn2[None, :, :] & mw0[:, None, None], other=0)
    for w0 in tl.range(w_start, w_end, BW, num_stages=LOOP_STAGES):  # > 1: cp.async stages (gemv.py's loop)
        rows_w = w0 + offs_w  # (BW,) word rows
        mw = rows_w < w_end
        m3 = mw[:, None, None] & mn2[None, :, :]
        if PREFETCH:
            words = nxt
            mwn = (rows_w + BW) < w_end
            nxt = tl.load(qweight_ptr + (rows_w + BW)[:, None, None] * QW_STRIDE + offs_n2[None, :, :],
                          mask=mwn[:, None, None] & mn2[None, :, :], other=0, eviction_policy=OWN)
        else:
            words = tl.load(qweight_ptr + rows_w[:, None, None] * QW_STRIDE + offs_n2[None, :, :], mask=m3, other=0,
                            eviction_policy=OWN)
        words = words.to(tl.uint32, bitcast=True)  # (BW, NREP, COLS)
        p = tl.zeros((BW, NREP, COLS), tl.float32)  # Σ_j (m_j + q_j) x_j per word
        xs = tl.zeros((BW,), tl.float32)  # Σ_j x_j per word row
        xm = tl.zeros((BW,), tl.float32)  # Σ_j m_j x_j
        for j in tl.static_range(PER):  # one LOP3 and one FFMA per code
            k = rows_w * PER + j
            src = tl.load(perm_ptr + k, mask=mw, other=0) if HAS_PERM else k  # x column of row k
            xj = tl.load(x_ptr + src, mask=mw, other=0).to(tl.float32)  # (BW,)
            p += _code_at(words, j, BITS, WIN) * xj[:, None, None]
            xs += xj
            xm += _magic(j, BITS, WIN) * xj
        if ONE_GROUP:  # the tile lies in one group: its statistics once
            g = (w0 * PER) // GROUP
            s = tl.load(scales_ptr + g * N + offs_n2, mask=mn2, other=0).to(tl.float32)  # (NREP, COLS)
            z = _zeros_at(zeros_ptr, g, offs_n2, mn2, N, BITS, FLOAT_ZEROS)
            acc += s[None, :, :] * (p - xm[:, None, None] - xs[:, None, None] * z[None, :, :])
        else:  # each word row its own group's
            g3 = ((rows_w * PER) // GROUP)[:, None, None]  # (BW, 1, 1)
            s = tl.load(scales_ptr + g3 * N + offs_n2[None, :, :], mask=m3, other=0).to(tl.float32)
            z = _zeros_at(zeros_ptr, g3, offs_n2[None, :, :], m3, N, BITS, FLOAT_ZEROS)
            acc += s * (p - xm[:, None, None] - xs[:, None, None] * z)
        if HAS_LORA and not UPRE:  # over rows in x's own order: the splits' ranges partition K, A read contiguously
            kk = w0 * PER + offs_k
            mk = kk < w_end * PER
            xl = tl.load(x_ptr + kk, mask=mk, other=0).to(tl.float32)
            at = tl.load(a_ptr + offs_r[:, None] * K + kk[None, :], mask=mr[:, None] & mk[None, :], other=0)
            xa += at.to(x_ptr.dtype.element_ty).to(tl.float32) * xl[None, :]  # A in x's dtype, as in training
    if AHEAD == 2:  # after this program's own words: the DRAM idles through the split-K tail and the launches
        _l2_ahead(ahead_ptr, AHEAD_LINES, PFB, EVICT_LAST)  # between, unless asked for the next layer's
    y = tl.sum(acc, axis=0)  # (NREP, COLS)
    if HAS_LORA:  # + s (x_c A_cᵀ) B_nᵀ
        dt = x_ptr.dtype.element_ty
        if UPRE:  # u over all of K, computed once per call (a_ptr points at this projection's u): split 0 adds it
            mr0 = offs_r < tl.where(pid_k == 0, R, 0)  # (BR,): the ranks, in split 0 only
            xr = tl.load(a_ptr + offs_r, mask=mr0, other=0).to(dt).to(tl.float32)  # (BR,)
            mb = mr0[None, :, None] & mn2[:, None, :]
        else:
            xr = tl.sum(xa, axis=1).to(dt).to(tl.float32)  # (BR,), rounded to x's dtype as in training
            mb = mr[None, :, None] & mn2[:, None, :]
        bt = tl.load(b_ptr + (offs_n2 - n_off)[:, None, :] * R + offs_r[None, :, None], mask=mb, other=0)
        y += lora_scale * tl.sum(bt.to(dt).to(tl.float32) * xr[None, :, None], axis=1)  # (NREP, COLS)
    offs_n = pid_n * BN + tl.arange(0, BN)
    _store_split(tl.reshape(y, (1, BN)), out_ptr, part_ptr, lock_ptr, pid_n, pid_k, tl.arange(0, 1), offs_n,
                 (offs_n < N)[None, :], 1, N, SPLIT, SPLIT_K, 1, BN)


_launch = FastKernel(_gemv_m1_kernel)


def tile_rows(bits: int, k: int, bw: int) -> int:
    """Word rows per tile: bw cut to a power of two whose rows divide K (0: none does)."""
    per = 32 // bits
    while bw and (k % (bw * per)):
        bw //= 2
    return bw


def takes(m: int, k: int, bits: int, plan, spqr: bool, bounds: tuple[int, int] | None = None) -> bool:
    """Whether this kernel serves the call: one token, 2/4 bit (8 too under GPTQLORA_GEMV_M1=inplace; none
    under "split"), rows in group order (the layer's own or its act-order copy), K and the group multiples of
    a word's rows (a word in one group), siblings' column bounds multiples of 16 (a column block of >= 16
    inside one projection)."""
    per = 32 // bits if 32 % bits == 0 else 0
    mode = os.environ.get(ENV, "")
    wanted = bits in DEFAULT_BITS if mode == "" else mode == "inplace"
    return (wanted and m == 1 and not spqr and per > 0 and plan.sorted and k % per == 0 and plan.group % per == 0
            and (bounds is None or not (bounds[0] % 16 or bounds[1] % 16)))


def lora_slots(lora_a, lora_b, x: torch.Tensor, bounds: tuple[int, int] | None, n: int):
    """The three (A, B) pointer pairs the decode kernels take (this one and gemv.py's): one tensor or a list
    of one per projection (as many as `bounds` make: 1, 2 or 3), contiguous, padded with the last (unread);
    x stands in when there is no adapter (siblings without one too). Returns (a_s, b_s, rank, has_lora)."""
    has_lora = lora_a is not None and (not isinstance(lora_a, (list, tuple)) or len(lora_a) > 0)
    a_s = [t.contiguous() for t in (lora_a if isinstance(lora_a, (list, tuple)) else [lora_a])] if has_lora else [x]
    b_s = [t.contiguous() for t in (lora_b if isinstance(lora_b, (list, tuple)) else [lora_b])] if has_lora else [x]
    if has_lora and (len(a_s) != projections(bounds, n) or len(b_s) != len(a_s)):
        raise ValueError(f"{len(a_s)} LoRA A and {len(b_s)} B for "
                         f"{'one layer' if bounds is None else 'bounds ' + str(bounds)}")
    r = b_s[0].shape[1] if has_lora else 1
    return a_s + [a_s[-1]] * (3 - len(a_s)), b_s + [b_s[-1]] * (3 - len(b_s)), r, has_lora


def tuned_key(bits: int, k: int, n: int) -> str:
    """This kernel's key in the tuned table (kernels/gemv_configs.json or $GPTQLORA_GEMV_CONFIGS)."""
    return f"m1,{bits},{k},{n}"


def heuristic_config(k: int, n: int, bits: int, group: int, sms: int = 132) -> dict:
    """Untuned: two column blocks per thread, a tile of one group's rows where that is 4-8 word rows, 8 warps
    (4 at 2 bit, whose tiles are 4 rows), and split-K for ~2 programs per SM."""
    per = 32 // bits
    bw = max(4, min(8, group // per)) if group > 0 else 8
    nrep = 2
    warps = min(8, bw)
    split = max(1, round(2 * sms / triton.cdiv(n, COLS * nrep)))
    return dict(NREP=nrep, BW=bw, SPLIT=split, num_warps=warps)


def legal_config(cfg: dict, k: int, n: int, bits: int, bounds: tuple[int, int] | None) -> dict:
    """cfg made valid for the call: BW a power of two of word rows dividing K, no more warps than word rows,
    a column block (NREP * COLS, COLS 128 or less) inside one sibling projection, SPLIT leaving every split
    rows."""
    cfg = dict(cfg)
    cfg["BW"] = bw = max(1, tile_rows(bits, k, cfg["BW"]))
    cfg["num_warps"] = max(1, min(cfg["num_warps"], bw))
    cfg["COLS"] = COLS
    if bounds is not None:  # a column block inside one projection; >= 16 columns (split-K: a counter per 16)
        n1, n2 = bounds
        while cfg["NREP"] > 1 and (n1 % (cfg["COLS"] * cfg["NREP"]) or n2 % (cfg["COLS"] * cfg["NREP"])):
            cfg["NREP"] //= 2
        while cfg["COLS"] > 16 and (n1 % cfg["COLS"] or n2 % cfg["COLS"]):
            cfg["COLS"] //= 2
    kw = k // (32 // bits)
    split = max(1, min(cfg["SPLIT"], kw // bw))
    cfg["SPLIT"] = triton.cdiv(kw, triton.cdiv(triton.cdiv(kw, split), bw) * bw)  # no split without rows
    return cfg


def ahead_config(ahead: torch.Tensor | None) -> tuple[int, int, bool, bool]:
    """(AHEAD, lines, EVICT_LAST, OWN_FIRST) of a call whose next launch reads `ahead` (its packed weight).

    Why: a 7B layer at 4 bit is 8-45 MB, read in 10-35 us, and each launch begins with a ramp (every program
    waits for its first words) and ends with the split-K tail (only a column block's last program works); the
    DRAM idles through both and through the small kernels between two layers (norms, attention). Session 12's
    ncu read 19-41% of peak DRAM throughput over the kernel's span. Asking L2 for the next launch's words
    while this one finishes keeps the DRAM busy there, and that launch then starts from L2. The L2 holds 50
    MB (H100, H200), so a part of the largest (gate|up, 45 MB) is asked for. GPTQLORA_L2_AHEAD sets how much;
    off (0) unless set, and always off in the interpreter and on the CPU (an inline PTX prefetch)."""
    spec = os.environ.get(AHEAD_ENV, "0").strip().lower()
    if (ahead is None or ahead.device.type != "cuda" or ahead.dtype != torch.int32 or spec in ("", "0")
            or os.environ.get("TRITON_INTERPRET") == "1"):
        return 0, 0, False, False
    nbytes = ahead.numel() * ahead.element_size()
    if spec != "all":
        nbytes = min(nbytes, int(float(spec) * 2**20))
    lines = nbytes // 128
    at = 1 if os.environ.get(AHEAD_AT_ENV, "end") == "start" else 2
    return (at if lines else 0), lines, os.environ.get(AHEAD_LAST_ENV, "1") != "0", \
        os.environ.get(OWN_FIRST_ENV, "0") == "1"


def self_first(x: torch.Tensor) -> bool:
    """GPTQLORA_L2_SELF=1: each program asks L2 for all of its own words before its loop (`_l2_self`). Why: the
    loop reads one tile, waits, computes, reads the next (Triton keeps loads into registers out of its software
    pipeliner, session 12), so a program has one tile in flight; asked ahead, every later tile comes from L2.
    Off in the interpreter and on the CPU (inline PTX)."""
    return (os.environ.get(SELF_ENV, "0") == "1" and x.device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1")


def gemv_m1(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, plan,
            cfg: dict, lora_a: torch.Tensor | list[torch.Tensor] | None = None,
            lora_b: torch.Tensor | list[torch.Tensor] | None = None,
            scaling: float = 1.0, bounds: tuple[int, int] | None = None,
            ahead: torch.Tensor | None = None) -> torch.Tensor:
    """x (1, K) -> (1, N) in x's dtype through `plan` (gemv.GemvPlan with rows in group order: `plan.qweight`
    is read, with a row stride that may exceed N for a column slice of a siblings' copy); `cfg` a legal
    config; lora_a, lora_b as gemv.gemv_triton's (one layer's, or one per projection of `bounds`); `ahead`
    the next launch's packed weight, asked of L2 under GPTQLORA_L2_AHEAD (`ahead_config`), else unread."""
    k = x.shape[1]
    n = qweight.shape[1]
    qw = plan.qweight
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    split = cfg["SPLIT"]
    part = torch.empty(split, 1, n, dtype=torch.float32, device=x.device) if split > 1 else out
    a_s, b_s, r, has_lora = lora_slots(lora_a, lora_b, x, bounds, n)
    upre = has_lora and os.environ.get(U_ENV, "0") == "1"
    if upre:  # u (1, r) fp32 in each A's place
        a_s = u_slots(x, a_s, bounds, n, plan.locks)
    n1, n2 = bounds if bounds is not None else (n, n)
    per = 32 // bits
    cols = cfg.get("COLS", COLS)
    grid = (triton.cdiv(n, cols * cfg["NREP"]), split)
    at, lines, evict_last, own_first = ahead_config(ahead)
    _launch[grid](x, qw, zeros, scales, plan.perm if plan.perm is not None else plan.locks, a_s[0], b_s[0], a_s[1],
                  b_s[1], a_s[2], b_s[2], out, part, plan.locks, ahead if at else plan.locks, k, n, n1, n2,
                  qw.stride(0), r, plan.group, float(scaling), split, lines, BITS=bits,
                  FLOAT_ZEROS=zeros.is_floating_point(),
                  HAS_PERM=plan.perm is not None, HAS_LORA=has_lora, SPLIT_K=split > 1,
                  ONE_GROUP=plan.group % (cfg["BW"] * per) == 0, BW=cfg["BW"], NREP=cfg["NREP"],
                  COLS=cols, BR=max(2, triton.next_power_of_2(r)), PREFETCH=bool(cfg.get("PREFETCH", 0)),
                  LOOP_STAGES=cfg.get("loop_stages", 1), UPRE=upre, AHEAD=at, PFB=32 * cfg["num_warps"],
                  EVICT_LAST=evict_last, OWN_FIRST=own_first, SELF_PF=self_first(x), num_warps=cfg["num_warps"])
    return out
