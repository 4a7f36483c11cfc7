"""Small-M (1-16 tokens: decoding) GPTQ matmul with the LoRA update fused in, reading the packed weights once:

    y = x @ dequant(W) + s * (x @ Aᵀ) @ Bᵀ        x (M, K), W (K, N) packed, A (r, K), B (N, r), y (M, N)

At decode sizes the work is bound by reading the weights (0.25-1 byte per weight against 2 for bf16), so
the kernel never writes a dense W: each program streams a K-range of packed words for BN output columns,
unpacks them in registers and accumulates in fp32. Design (bench/notes_decode.md has the numbers):

- Groups: where the packed rows are in group order (`sorted`: no act-order, or an act-order layer's
  repacked copy, see `plan_gemv`), a tile of BK rows lies in one group, so its scales and zeros are
  loaded once per tile and the zero is factored out: Σ_k x_k s (q_k - z) = s (Σ_k x_k q_k - z Σ_k x_k).
  The repacked copy of an act-order layer reads x in the permuted order (`perm`), so nothing else changes.
  Without it (`sorted` False: any g_idx) each row gathers its own group's scales and zeros.
- M = 1 multiplies on the FMA units (broadcast and sum); M = 2..16 pads to 16 and uses tl.dot (tensor cores)
  on codes converted exactly to x's dtype (integers <= 255 are exact in fp16 and bf16).
- LoRA unmerged at nearly no cost: the product is linear in x, so each program adds s * (x_c @ A_cᵀ) @ B_nᵀ
  for its own K-range c and columns n. A is read once per column block (r / BN of the weight reads).
- Split-K fills the card when N / BN programs are too few: each program stores an fp32 partial and the last
  of a column block sums them in a fixed order (split_k.py). One launch per layer and deterministic.

2/4/8-bit codes are unpacked from whole words (one load per 32-bit word); 3-bit codes of whole 32-row blocks
from their three words (each code shifted out of a 64-bit pair), of shorter tiles through dequant's
`_unpack`. `gemv_reference` beside it is the torch ground truth. One-token calls of 2/4-bit rows in group
order go to gemv_m1.py (measured faster in a whole 7B; GPTQLORA_GEMV_M1=split keeps them here).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from gptqlora.formats.gptq import pack_rows, unpack_rows
from gptqlora.kernels.dequant import _stat_at, _unpack, _zeros_at, plan_for
from gptqlora.kernels import gemv_m1, gemv_mma
from gptqlora.kernels.dispatch import MAX_M  # the kernel's largest token count
from gptqlora.kernels.launch import FastKernel
from gptqlora.kernels.split_k import _store_split
from gptqlora.kernels.reference import dequantize


@triton.jit
def _codes(qweight_ptr, k0, offs_n, k_end, N, QW_STRIDE, BITS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Codes of packed rows [k0, k0 + BK) at columns offs_n: a (BK, BN) uint32 tile, 0 beyond k_end or N.
    QW_STRIDE: words from one packed row to the next (N, or wider for a column slice of a siblings' copy)."""
    mn = offs_n < N
    if 32 % BITS == 0:  # whole words: each word holds PER consecutive rows of one column
        PER: tl.constexpr = 32 // BITS
        w_rows = k0 // PER + tl.arange(0, BK // PER)  # (BK/PER,)
        mw = (w_rows < k_end // PER)[:, None] & mn[None, :]
        words = tl.load(qweight_ptr + w_rows[:, None] * QW_STRIDE + offs_n[None, :], mask=mw, other=0)
        words = words.to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # (BK/PER, PER, BN)
        return tl.reshape(q, (BK, BN))  # row w * PER + j
    elif BK % 32 == 0:  # 3 bit, whole 32-row blocks: 3 words each, loaded once (not per code)
        # rows 0..20 of a block lie in the 64 bits w0|w1 (row j at bit 3j), rows 21..31 in w1|w2 (at bit 3j - 32):
        # every code inside one 64-bit pair, so one shift of the pair gives it, straddling or not
        blk = k0 // 32 + tl.arange(0, BK // 32)  # (BK/32,)
        mw = (blk * 32 < k_end)[:, None] & mn[None, :]
        at = qweight_ptr + (blk * 3)[:, None] * QW_STRIDE + offs_n[None, :]  # (BK/32, BN): each block's w0
        w0 = tl.load(at, mask=mw, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w1 = tl.load(at + QW_STRIDE, mask=mw, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w2 = tl.load(at + 2 * QW_STRIDE, mask=mw, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        j = tl.arange(0, 32)
        first = (j < 21)[None, :, None]
        shift = tl.where(j < 21, 3 * j, 3 * j - 32).to(tl.uint64)[None, :, None]
        pair = tl.where(first, (w0 | (w1 << 32))[:, None, :], (w1 | (w2 << 32))[:, None, :])  # (BK/32, 32, BN)
        q = ((pair >> shift) & 7).to(tl.uint32)
        return tl.reshape(q, (BK, BN))  # row b * 32 + j
    else:  # 3 bit, tiles under 32 rows: 32 rows fill 3 words, two of the codes straddle
        k = k0 + tl.arange(0, BK)
        bit = k * BITS
        m2 = (k < k_end)[:, None] & mn[None, :]
        return _unpack(qweight_ptr, (bit // 32)[:, None] * QW_STRIDE + offs_n[None, :], (bit % 32)[:, None], QW_STRIDE,
                       m2, BITS)


@triton.jit
def _as_float(q):
    """uint32 codes (< 2^23) -> fp32, exact: OR-ed into the mantissa of 2^23, which is then subtracted (a
    LOP3 and an FADD instead of an integer-to-float conversion)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _mm(a, b, DOT: tl.constexpr, F32_DOT: tl.constexpr):
    """(BM, BK) @ (BK, BN) -> fp32 (BM, BN): tensor cores (BM >= 16; b rounded to a's dtype, exact for codes)
    or broadcast-and-sum on the FMA units in fp32. b arrives in fp32 (the interpreter cannot convert
    integers to bf16 directly)."""
    if DOT and F32_DOT:  # Triton's interpreter gets bf16 dots wrong; the same exact products in fp32
        return tl.dot(a.to(tl.float32), b.to(a.dtype).to(tl.float32), input_precision="ieee")
    if DOT:
        return tl.dot(a, b.to(a.dtype), input_precision="ieee")
    return tl.sum(a.to(tl.float32)[:, :, None] * b[None, :, :], axis=1)


@triton.jit(do_not_specialize=["M", "SPLIT"])  # one compilation for M = 2..16 and for any split count
def _gemv_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, a_ptr, b_ptr, a1_ptr, b1_ptr, a2_ptr,
                 b2_ptr, out_ptr, part_ptr,
                 lock_ptr, sc_ptr, ss_ptr, sb_ptr, zc_ptr, zs_ptr, zb_ptr, M, K, N, N1, N2, QW_STRIDE, R, GROUP, lora_scale, SPLIT, SG,
                 SPQR: tl.constexpr, SBITS: tl.constexpr, BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr, SORTED: tl.constexpr, HAS_PERM: tl.constexpr,
                 HAS_LORA: tl.constexpr, SPLIT_K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                 BN: tl.constexpr, BR: tl.constexpr, F32_DOT: tl.constexpr, LOOP_STAGES: tl.constexpr,
                 SUB: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    DOT: tl.constexpr = BM >= 16
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mm, mn = offs_m < M, offs_n < N
    span = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK  # rows per split, whole tiles
    k_start = pid_k * span
    k_end = tl.minimum(K, k_start + span)
    acc = tl.zeros((BM, BN), tl.float32)
    offs_r = tl.arange(0, BR)
    mr = offs_r < R
    xa = tl.zeros((BM, BR), tl.float32)  # x_c @ A_cᵀ of this K-range
    ROW: tl.constexpr = BM == 1  # one token: the LoRA's x_k A[:, k] kept per row k, summed after the loop
    xa2 = tl.zeros((BK if ROW else 1, BR), tl.float32)
    # sibling projections in one launch (q|k|v, gate|up): columns [N1, N2) are the second (LoRA a1, b1),
    # [N2, N) the third (a2, b2); a column block lies in one of them (BN divides N1 and N2)
    n_first = pid_n * BN
    n_off = N1 * 0  # the projection's first column, where its B starts
    if n_first >= N2:
        a_ptr, b_ptr, n_off = a2_ptr, b2_ptr, N2
    elif n_first >= N1:
        a_ptr, b_ptr, n_off = a1_ptr, b1_ptr, N1
    # LOOP_STAGES > 1: Triton's pipeliner copies the next tiles' words asynchronously into shared memory
    # (cp.async) while this one is computed; it stages loads of a loop without a dot only when asked here
    # (the kernel's num_stages does not reach such loops: no LDGSTS in their SASS at any num_stages)
    for k0 in tl.range(k_start, k_end, BK, num_stages=LOOP_STAGES):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < k_end
        src = tl.load(perm_ptr + offs_k, mask=mk, other=0) if HAS_PERM else offs_k  # x column of each row
        xt = tl.load(x_ptr + offs_m[:, None] * K + src[None, :], mask=mm[:, None] & mk[None, :], other=0)  # (BM, BK)
        if SORTED and SUB < BK:  # one token, a tile over BK / SUB whole groups of SUB rows (small groups such
            # as SpQR's 16, which would otherwise cut the tile to 16 rows): per group as below, then summed
            gs = k0 // GROUP + tl.arange(0, BK // SUB)  # (T,) the tile's groups
            m2 = (gs * SUB < k_end)[:, None] & mn[None, :]
            if SPQR:
                s = _stat_at(sc_ptr, ss_ptr, sb_ptr, gs[:, None], offs_n[None, :], m2, N, SG, SBITS).to(tl.float16).to(tl.float32)
                z = _stat_at(zc_ptr, zs_ptr, zb_ptr, gs[:, None], offs_n[None, :], m2, N, SG, SBITS)
            else:
                s = tl.load(scales_ptr + gs[:, None] * N + offs_n[None, :], mask=m2, other=0).to(tl.float32)  # (T, BN)
                z = _zeros_at(zeros_ptr, gs[:, None], offs_n[None, :], m2, N, BITS, FLOAT_ZEROS)  # (T, BN)
            q = _codes(qweight_ptr, k0, offs_n, k_end, N, QW_STRIDE, BITS, BK, BN)  # (BK, BN)
            x3 = tl.reshape(xt.to(tl.float32), (BK // SUB, SUB))  # BM == 1
            p = tl.sum(x3[:, :, None] * tl.reshape(_as_float(q), (BK // SUB, SUB, BN)), axis=1)  # (T, BN): Σ_k x q
            xs = tl.sum(x3, axis=1)  # (T,)
            acc += tl.sum(s * (p - xs[:, None] * z), axis=0)[None, :]
        elif SORTED:  # one group per tile: scales and zeros once, the zero factored out
            g = k0 // GROUP
            if SPQR:  # SpQR: the statistics decoded from their codes here, once per tile
                s = _stat_at(sc_ptr, ss_ptr, sb_ptr, g, offs_n, mn, N, SG, SBITS).to(tl.float16).to(tl.float32)
                z = _stat_at(zc_ptr, zs_ptr, zb_ptr, g, offs_n, mn, N, SG, SBITS)
            else:
                s = tl.load(scales_ptr + g * N + offs_n, mask=mn, other=0).to(tl.float32)  # (BN,)
                z = _zeros_at(zeros_ptr, g, offs_n, mn, N, BITS, FLOAT_ZEROS)  # (BN,)
            q = _codes(qweight_ptr, k0, offs_n, k_end, N, QW_STRIDE, BITS, BK, BN)  # (BK, BN)
            p = _mm(xt, _as_float(q), DOT, F32_DOT)  # (BM, BN): Σ_k x q, exact products
            xs = tl.sum(xt.to(tl.float32), axis=1)  # (BM,)
            acc += s[None, :] * (p - xs[:, None] * z[None, :])
        else:  # any g_idx: each row its own group
            q = _codes(qweight_ptr, k0, offs_n, k_end, N, QW_STRIDE, BITS, BK, BN)  # (BK, BN)
            g = tl.load(g_idx_ptr + offs_k, mask=mk, other=0)[:, None]  # (BK, 1)
            m2 = mk[:, None] & mn[None, :]
            if SPQR:
                s = _stat_at(sc_ptr, ss_ptr, sb_ptr, g, offs_n[None, :], m2, N, SG, SBITS).to(tl.float16).to(tl.float32)
                z = _stat_at(zc_ptr, zs_ptr, zb_ptr, g, offs_n[None, :], m2, N, SG, SBITS)
            else:
                s = tl.load(scales_ptr + g * N + offs_n[None, :], mask=m2, other=0).to(tl.float32)
                z = _zeros_at(zeros_ptr, g, offs_n[None, :], m2, N, BITS, FLOAT_ZEROS)
            w = (_as_float(q) - z) * s  # (BK, BN), rounded to x's dtype as the reference's dense W is
            acc += _mm(xt, w.to(xt.dtype).to(tl.float32), DOT, F32_DOT)
        if HAS_LORA:  # over rows in x's own order: the splits' ranges still partition K, and A is read contiguously
            if HAS_PERM:
                xl = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0)
            else:
                xl = xt
            at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=mk[:, None] & mr[None, :], other=0)
            if ROW:  # M = 1: no reduction across threads inside the loop
                xa2 += tl.reshape(xl, (BK,)).to(tl.float32)[:, None] * at.to(xt.dtype).to(tl.float32)
            else:
                xa += _mm(xl, at.to(xt.dtype).to(tl.float32), DOT, F32_DOT)  # (BM, BR); A in x's dtype as in training
    if HAS_LORA and ROW:
        xa += tl.sum(xa2, axis=0)[None, :]
    if HAS_LORA:
        bt = tl.load(b_ptr + (offs_n - n_off)[None, :] * R + offs_r[:, None], mask=mr[:, None] & mn[None, :], other=0)
        dt = x_ptr.dtype.element_ty
        acc += lora_scale * _mm(xa.to(dt), bt.to(dt).to(tl.float32), DOT, F32_DOT)  # (BM, BN)
    _store_split(acc, out_ptr, part_ptr, lock_ptr, pid_n, pid_k, offs_m, offs_n, mm[:, None] & mn[None, :], M, N, SPLIT,
                 SPLIT_K, BM, BN)


@dataclass(frozen=True)
class GemvPlan:
    """How the kernel reads one layer; built once per layer by `plan_gemv`.

    `qweight` is the layer's own packed weight, or for an act-order layer a copy with its rows in group
    order (the same bytes again: decode speed for memory) read with `perm` (x column of each packed row).
    `sorted`: packed row k is in group k // group. `locks`: the split-K counters, zero between calls.
    """

    qweight: torch.Tensor
    perm: torch.Tensor | None
    sorted: bool
    group: int
    locks: torch.Tensor


REPACK_CHUNK = 1024  # columns repacked at a time: transient int64 codes of K x 1024, not K x N
KEEP_FREE = 0.1  # an act-order copy is made only if this share of the card stays free after it


def room_for(nbytes: int, device: torch.device) -> bool:
    """Whether `device` can hold nbytes more and still keep KEEP_FREE of it free (always, off CUDA)."""
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    return free - nbytes > KEEP_FREE * total


def room_for_copy(qweight: torch.Tensor) -> bool:
    """Whether the card can hold a second copy of `qweight` and still keep KEEP_FREE of it free."""
    return room_for(qweight.numel() * 4, qweight.device)


def plan_gemv(qweight: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int,
              repack: bool | None = None, mma: bool = False, float_zeros: bool = False) -> GemvPlan:
    """The kernel's plan: sorted rows when g_idx is trivial; an act-order layer's rows repacked in group
    order (one copy of qweight, made once) when `repack` (None: when `room_for_copy`, warning otherwise),
    else the per-row gather of scales and zeros. `mma`: a copy in gemv_mma's fragment order instead (its
    `qweight` is then 4-D), where the layer is eligible and the card has room for it."""
    k, n = g_idx.shape[0], qweight.shape[1]
    locks = gemv_mma.counters(n, qweight.device)
    rows = plan_for(g_idx, group_size)
    gs = k if group_size == -1 else group_size
    slot = gemv_mma.slot_bits(bits)  # 3-bit codes in 4-bit slots: a third more than qweight's bytes
    if (mma and rows is not None and slot is not None and gemv_mma.eligible(slot, k, n, gs, float_zeros)
            and (qweight.device.type != "cuda" or gemv_mma.usable(qweight.device))
            and (repack or room_for(qweight.numel() * 4 * slot // bits, qweight.device))):
        return GemvPlan(gemv_mma.pack_gptq(qweight, bits, rows.perm, slot), rows.perm, True, gs, locks)
    if rows is not None and rows.perm is not None and repack is None:
        repack = room_for_copy(qweight)
        if not repack:
            warnings.warn("too little GPU memory for the act-order copies of the packed weights: decoding "
                          "gathers scales per row instead (slower)", stacklevel=2)
    if rows is None or (rows.perm is not None and not repack):
        return GemvPlan(qweight, None, False, gs, locks)
    if rows.perm is None:
        return GemvPlan(qweight, None, True, gs, locks)
    perm = rows.perm.long()
    copy = torch.empty_like(qweight)
    for c in range(0, n, REPACK_CHUNK):  # rows in group order, a block of columns at a time
        copy[:, c:c + REPACK_CHUNK] = pack_rows(unpack_rows(qweight[:, c:c + REPACK_CHUNK], bits)[perm], bits)
    return GemvPlan(copy, rows.perm, True, gs, locks)


def _pow2_divisor(n: int, cap: int) -> int:
    b = cap
    while n % b:
        b //= 2
    return b


TUNED_ENV = "GPTQLORA_GEMV_CONFIGS"  # a JSON file of tuned configs (bench/gemv_sweep.py writes one)
TUNED_FILE = Path(__file__).with_name("gemv_configs.json")  # the table shipped with the package, if present
TUNABLE = ("BN", "BK", "SPLIT", "num_warps", "num_stages", "loop_stages", "span")


def tuned_key(bits: int, m: int, k: int, n: int, sorted_rows: bool, spqr: bool = False) -> str:
    """The table's key: bit width, M bucket (1: FMA path, 16: tensor-core path for M = 2..16), K, N, and
    whether rows are read in group order ("sorted") or gathered; ",spqr" for SpQR's dense part (its
    statistics decoded per tile make it another kernel)."""
    return f"{bits},{1 if m == 1 else MAX_M},{k},{n},{'sorted' if sorted_rows else 'gather'}" + (",spqr" if spqr else "")


@functools.cache
def tuned_table() -> dict[str, dict]:
    """{tuned_key: {BN, BK, SPLIT, num_warps, num_stages} (any subset)} from $GPTQLORA_GEMV_CONFIGS,
    else from gemv_configs.json beside this file, else empty (the heuristic alone). Read once per process
    (`tuned_table.cache_clear()` re-reads it)."""
    path = os.environ.get(TUNED_ENV) or (TUNED_FILE if TUNED_FILE.exists() else None)
    return load_table(path) if path else {}


def load_table(path: str | Path) -> dict[str, dict]:
    """{tuned_key: config} of a table file: the sweep's whole output, or just its "configs" part."""
    table = json.loads(Path(path).read_text())
    table = table.get("configs", table)
    bad = {key: {f for f in cfg if f not in (gemv_m1.TUNABLE if key.startswith("m1,") else TUNABLE)}
           for key, cfg in table.items()}
    if any(bad.values()):
        raise ValueError(f"{path}: unknown gemv config fields {bad}; allowed: {TUNABLE} (m1 keys: {gemv_m1.TUNABLE})")
    return table


def heuristic_config(m: int, k: int, n: int, bits: int, plan: GemvPlan, sms: int = 132, spqr: bool = False) -> dict:
    """The untuned choice, from what won the 7B-shape sweeps on an H200 (calls 7 and 10,
    docs/benchmarks.md): BM 1 (FMA) or 16 (tensor cores); BK a power of two of whole words that divides the
    group in sorted mode; split-K for ~4 programs per SM, each keeping >= 2 tiles
    at M = 1 (the time is latency: many short programs in one wave beat a few long ones)."""
    grouped = plan.sorted and plan.group < k  # tiles are cut to divide the group
    # 3 bit: tiles of whole 32-row blocks unpack from three words loaded once (`_codes`): the 4-bit tiles at
    # M = 1 (offline sm_90: 168 registers, no spill). Before, every code loaded its own word(s), and BN 256 /
    # BK 128 spilled 7.8 KB per thread (H200, session 4: a GPTQ 3-bit 7B block in 9.59 ms). At M > 1 the
    # small tiles of that time (no spill); the wide ones spill 48 B. Neither 3-bit choice measured yet.
    three = 32 % bits != 0
    if m == 1:  # SpQR: BN 128 (its statistics' decoding spills 56 B per thread at 256 over 8 groups of 16)
        bn, bk, warps = (128 if spqr else 256, 128, 4 if bits >= 3 else 2)
    else:
        bn, bk, warps = (32, 32, 4) if three else (128, 64, 2)
    # one-token tiles span groups of <= 32 rows (SpQR's 16; GPTQ g32) rather than being cut to them
    span = int(m == 1 and grouped and spans_groups(1, bk, plan.group, rows_per_word(bits)) and plan.group <= 32)
    tile = bk if span else _pow2_divisor(plan.group, bk) if grouped else bk
    if m == 1:
        split = max(1, min(32, triton.cdiv(4 * sms, triton.cdiv(n, bn)), k // (2 * max(tile, 16))))
        # loop_stages 2 at 2 bit: it won every 7B shape's scan there (H100, session 13: 1.02-1.04x per layer),
        # 2 of 5 at 4 bit (kept in the table, not here); never measured at 3 or 8 bit
        return dict(BM=1, BK=bk, BN=bn, SPLIT=split, num_warps=warps, num_stages=3, loop_stages=2 if bits == 2 else 1,
                    span=span)
    split = max(1, min(16, triton.cdiv(4 * sms, triton.cdiv(n, bn)), k // (4 * max(tile, 16))))
    return dict(BM=MAX_M, BK=bk, BN=bn, SPLIT=split, num_warps=warps, num_stages=3, loop_stages=1)


def rows_per_word(bits: int) -> int:
    """Codes one 32-bit word holds whole (1 for 3 bit, whose codes straddle words)."""
    return 32 // bits if 32 % bits == 0 else 1


def spans_groups(bm: int, bk: int, group: int, per: int) -> bool:
    """Whether a one-token tile of `bk` rows may span several whole groups (the kernel's SUB path): groups of a
    power of two of at least 16 rows (and whole words) that divide the tile."""
    return bm == 1 and 16 <= group < bk and group & (group - 1) == 0 and group % per == 0


def legal_config(cfg: dict, k: int, bits: int, plan: GemvPlan) -> dict:
    """cfg made valid for this layer: BK a divisor of the group in sorted mode (0: the gather path, for a
    group no whole-word tile divides), SPLIT no larger than leaves every split some rows."""
    cfg = dict(cfg)
    per = rows_per_word(bits)
    bk = cfg["BK"]  # `span`: a one-token tile may span whole small groups (spans_groups) instead of being cut
    if plan.sorted and plan.group < k and not (cfg.get("span") and spans_groups(cfg["BM"], bk, plan.group, per)):
        bk = _pow2_divisor(plan.group, bk)
    if bk < max(per, 16):  # a group too odd for whole-word tiles: the gather path takes any rows
        bk = 0
    tile = bk or 64
    split = max(1, min(cfg["SPLIT"], triton.cdiv(k, tile)))
    cfg["SPLIT"] = triton.cdiv(k, triton.cdiv(triton.cdiv(k, split), tile) * tile)  # no split without rows
    cfg["BK"] = bk
    return cfg


_CONFIGS: dict = {}  # (m bucket, k, n, bits, sorted, group, sms) -> config: no host work per call


def pick_config(m: int, k: int, n: int, bits: int, plan: GemvPlan, sms: int = 132, spqr: bool = False) -> dict:
    """Tile sizes, warps and split-K for one call: the tuned table's entry for this shape where it has one
    (`tuned_table`), over the heuristic; cached per shape."""
    key = (1 if m == 1 else MAX_M, k, n, bits, plan.sorted, plan.group, sms, spqr)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = heuristic_config(m, k, n, bits, plan, sms, spqr)
        cfg.update(tuned_table().get(tuned_key(bits, m, k, n, plan.sorted, spqr), {}))
        cfg = _CONFIGS[key] = legal_config(cfg, k, bits, plan)
    return cfg


_launch = FastKernel(_gemv_kernel)
_M1_CONFIGS: dict = {}  # (k, n, bits, group, sms, bounds) -> gemv_m1 config: no host work per call


def pick_m1_config(k: int, n: int, bits: int, group: int, sms: int, bounds: tuple[int, int] | None) -> dict:
    """gemv_m1's config for one call: the tuned table's "m1,..." entry over its heuristic, made legal; cached."""
    key = (k, n, bits, group, sms, bounds)
    cfg = _M1_CONFIGS.get(key)
    if cfg is None:
        cfg = gemv_m1.heuristic_config(k, n, bits, group, sms)
        cfg.update(tuned_table().get(gemv_m1.tuned_key(bits, k, n), {}))
        cfg = _M1_CONFIGS[key] = gemv_m1.legal_config(cfg, k, n, bits, bounds)
    return cfg


def gemv_triton(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, plan: GemvPlan, lora_a: torch.Tensor | None = None,
                lora_b: torch.Tensor | None = None, scaling: float = 1.0, config: dict | None = None,
                sms: int = 132, spqr_stats: tuple | None = None, bounds: tuple[int, int] | None = None,
                ahead: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) with M <= 16 -> (M, N) in x's dtype: x @ dequant(W) [+ scaling * (x @ Aᵀ) @ Bᵀ].

    `ahead`: the packed weight the next decode launch reads; the one-token kernel asks L2 for it under
    GPTQLORA_L2_AHEAD (gemv_m1.ahead_config), the other kernels ignore it.

    `bounds` (n1, n2): W is two or three sibling projections side by side (columns [0, n1), [n1, n2),
    [n2, N); n2 = N for two), each with its own LoRA: `lora_a` and `lora_b` are then lists of their A (r, K)
    and B (N_p, r), one per projection, all of one rank and dtype. One launch for all of them.

    `spqr_stats` (SpQR's dense part): (stat_bits, scales_code, scales_step, scales_base, zeros_code,
    zeros_step, zeros_base), decoded in the kernel; `zeros` and `scales` are then unread.

    `qweight` is the layer's own (the plan may hold a repacked copy, which is what is read); `zeros`
    packed int32 [G, N*b/32] or float [G, N] (with a gemv_mma plan of a 3-bit layer, read in 4-bit slots:
    `gemv_mma.slot_zeros`); `config` overrides `pick_config` (bench/gemv_sweep.py sweeps
    it; it is made legal for the layer by `legal_config`).
    """
    m, k = x.shape
    n = qweight.shape[1]
    if m > MAX_M:
        raise ValueError(f"gemv_triton takes at most {MAX_M} rows, got {m}")
    if plan.qweight.dim() == 4:  # planned for the tensor-core kernel (gemv_mma); a call it cannot take: dense
        a_l = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a] if lora_a is not None else []
        b_l = lora_b if isinstance(lora_b, (list, tuple)) else [lora_b] if lora_b is not None else []
        slot = gemv_mma.slot_bits(bits)  # the width the copy holds the codes at (3 bit: 4-bit slots)
        if spqr_stats is None and gemv_mma.takes(x, scales, a_l, b_l):
            return gemv_mma.gemv_mma(x, plan.qweight, zeros, scales, slot, plan.group, plan.perm, plan.locks,
                                     list(a_l), list(b_l), scaling, bounds, sms)
        return _dense(x, zeros, scales, slot, plan, a_l, b_l, scaling, bounds)
    if config is None and gemv_m1.takes(m, k, bits, plan, spqr_stats is not None, bounds):  # opt-in, one token
        return gemv_m1.gemv_m1(x, qweight, zeros, scales, bits, plan, pick_m1_config(k, n, bits, plan.group, sms, bounds),
                               lora_a, lora_b, scaling, bounds, ahead)
    spqr = spqr_stats is not None
    cfg = pick_config(m, k, n, bits, plan, sms, spqr) if config is None else \
        legal_config({**heuristic_config(m, k, n, bits, plan, sms, spqr), **config}, k, bits, plan)
    cfg = dict(cfg)
    n1, n2 = bounds if bounds is not None else (n, n)
    while n1 % cfg["BN"] or n2 % cfg["BN"]:  # a column block must lie in one projection
        cfg["BN"] //= 2
    sorted_rows = plan.sorted and cfg["BK"] > 0
    if cfg["BK"] == 0:
        cfg["BK"] = 64
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = cfg.pop("SPLIT")
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    a_s, b_s, r, has_lora = gemv_m1.lora_slots(lora_a, lora_b, x, bounds, n)
    qw = plan.qweight if sorted_rows else qweight
    if qw.stride(1) != 1:
        raise ValueError("the packed weight's columns must be contiguous (a column slice of a wider copy is fine)")
    perm = plan.perm if sorted_rows and plan.perm is not None else g_idx  # unread without HAS_PERM
    grid = (triton.cdiv(n, cfg["BN"]), split)
    if spqr_stats is not None:
        sbits, *stats = spqr_stats
        sg = n // stats[1].shape[-1]
    else:
        sbits, stats, sg = 1, [g_idx] * 6, 1  # unread without SPQR
    _launch[grid](x, qw, zeros, scales, g_idx, perm, a_s[0], b_s[0], a_s[1], b_s[1], a_s[2], b_s[2], out, part, plan.locks, *stats, m, k, n, n1, n2, qw.stride(0), r, plan.group,
                  float(scaling), split, sg, SPQR=spqr_stats is not None, SBITS=sbits, BITS=bits, FLOAT_ZEROS=zeros.is_floating_point(), SORTED=sorted_rows,
                  HAS_PERM=sorted_rows and plan.perm is not None, HAS_LORA=has_lora, SPLIT_K=split > 1,
                  BM=cfg["BM"], BK=cfg["BK"], BN=cfg["BN"], BR=max(16, triton.next_power_of_2(r)),
                  F32_DOT=os.environ.get("TRITON_INTERPRET") == "1", LOOP_STAGES=cfg.get("loop_stages", 1),
                  SUB=plan.group if sorted_rows and plan.group < cfg["BK"] else cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _dense(x, zeros, scales, bits, plan, lora_a, lora_b, scaling, bounds) -> torch.Tensor:
    """gemv_triton's result through the dense reference, for the calls a gemv_mma plan's kernel cannot take
    (off CUDA, fp32 x, an adapter of another dtype or rank > gemv_mma.MAX_R): correct, not fast. The codes
    are read back from the plan's fragment copy, at `bits`, the width it holds them at (and `zeros` with them:
    a 3-bit layer's in 4-bit slots), as the kernel would read them: the copy holds the codes in group order,
    its perm the rows."""
    n = scales.shape[1]
    edges = [0, n] if bounds is None else [0, bounds[0], bounds[1], n][:4 if bounds[1] < n else 3]
    y = gemv_mma.emulate(x.float(), plan.qweight, zeros, scales, bits, plan.group, plan.perm)
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        y[:, edges[i]:edges[i + 1]] += scaling * (x.float() @ a.float().t()) @ b.float().t()
    return y.to(x.dtype)


def gemv_reference(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, bits: int, lora_a: torch.Tensor | None = None,
                   lora_b: torch.Tensor | None = None, scaling: float = 1.0) -> torch.Tensor:
    """The torch ground truth of gemv_triton, in fp32 (rounded once to x's dtype)."""
    xf = x.float()
    y = xf @ dequantize(qweight, zeros, scales, g_idx, bits, torch.float32)
    if lora_a is not None:
        y = y + scaling * (xf @ lora_a.float().t()) @ lora_b.float().t()
    return y.to(x.dtype)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@torch.library.custom_op("gptqlora::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
             plan_qweight: torch.Tensor, perm: torch.Tensor | None, locks: torch.Tensor, lora_a: list[torch.Tensor],
             lora_b: list[torch.Tensor], bits: int, group: int, sorted_rows: bool, scaling: float,
             n1: int = -1, n2: int = -1, ahead: torch.Tensor | None = None) -> torch.Tensor:
    # An opaque op for torch.compile (and CUDA graphs): the split-K counters it touches end as they began.
    # lora_a, lora_b: [] (no adapter), one per layer; n1, n2: sibling projections' column bounds (gemv_triton's
    # `bounds`), -1 for one layer; ahead: the next launch's packed weight (gemv_triton's), or None.
    plan = GemvPlan(plan_qweight, perm, sorted_rows, group, locks)
    return gemv_triton(x, qweight, zeros, scales, g_idx, bits, plan, list(lora_a) or None, list(lora_b) or None,
                       scaling, sms=_sm_count(x.device), bounds=None if n1 < 0 else (n1, n2), ahead=ahead)


@_gemv_op.register_fake
def _(x, qweight, zeros, scales, g_idx, plan_qweight, perm, locks, lora_a, lora_b, bits, group, sorted_rows, scaling,
      n1=-1, n2=-1, ahead=None):
    return x.new_empty((x.shape[0], scales.shape[1]))

