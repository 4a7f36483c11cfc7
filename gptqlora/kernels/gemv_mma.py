"""Decode (M <= 16 tokens) through the tensor cores: a CUDA kernel (gemv_mma.cu) over a fragment-ordered copy of
the packed codes, for 2- and 4-bit layers (packed or float zeros) and SpQR's codes (SpQRLinear.mma_plan).

    y = x @ dequant(W) + s * (x @ Aᵀ) @ Bᵀ        x (M, K), W (K, N) packed, A (r, K), B (N, r), y (M, N)

Why CUDA and not another Triton kernel: sessions 4-14 (bench/notes_decode.md) took three Triton designs to
~7-8 thread instructions per code, of which the code work is ~2.3; the rest is per-tile gathers of x, scales
and zeros that Triton's layouts give every thread, and Triton does not let a kernel place codes straight into
tensor-core operand registers. Here each lane's 16-byte load holds exactly its mma.m16n8k16 A fragments for
four words of k-steps (`pack`: the layout Marlin and its kin use, built here from GPTQ's), x sits in shared
memory once per block, and a pair of codes becomes a fragment register with a shift and a LOP3; the zeros
come off once per group (offline sm_90 SASS: 1.25 instructions per code in the loop against ~7). The same
launch serves M = 1..8 (one mma per tile; 9..16 take two), where the Triton M > 1 kernel runs at a third of
its M = 1 speed. Written here because no library decodes GPTQ's act-order layout with a fused LoRA on the
tensor cores at 2 bit (Marlin-family kernels: 4/8 bit, no adapter; session 9-10's tinygemm and GemLite peers
were slower than the Triton kernels).

Measured once (session 16, H100; docs/benchmarks.md): correct in every check, but not faster than the Triton
kernels at one token (11.8 against 12.6 us at 4096x4096 4 bit, 0.81-0.85x at the larger 7B shapes; the 7B
decodes at 1.37x bf16 through it against 1.91x through the default), and 1.0-1.6x faster at 8 tokens. Its time
is a per-block latency chain, not the k-loop; the M-dependent parts of that chain were cut after the
measurement (unmeasured). Hence opt-in. Session 17 found the adapter's share to be 26 of the 55 us of a
4096x22016 layer (29 us without it, faster than the Triton path with its adapter): each block computed its
split's share of u = x Aᵀ before its k-steps. Since then u comes computed once per call (kernels/lora_u.py, one
launch for all siblings) and u Bᵀ is added where the cells are stored (`UPRE`, above `UPRE_MIN_AREA`).

Session 19 (H100): with lora_u split over K, still ~15% slower than the Triton kernels at one row (the 7B
1.42x bf16 against 1.71x), but 1.4-2.5x faster per layer from two rows on, and the 7B at batch 2 / 4 / 8
1.96x / 1.62x / 1.30x the Triton kernels' tokens/s. Hence the default from two rows (`wanted`).

No CUDA toolchain is needed where it runs: NVRTC (shipped with PyTorch's CUDA wheels) compiles the source at
the first call of each configuration (well under a second), and the driver loads the PTX. Nothing here is
read off CUDA: the packed layout, `pack` and `emulate` (the kernel's arithmetic in torch, the CPU tests' check
of the layout against PTX's fragment tables) run anywhere.

The copy is a non-persistent buffer like the act-order copy it replaces (same bytes as qweight; without
act-order it is one more copy), made where `wanted` says so and the layer fits (`eligible`); state_dict and
checkpoints stay GPTQ's.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from gptqlora.formats.gptq import pack_cols, unpack_cols, unpack_rows
from gptqlora.formats.spqr import csr_rows

ENV = "GPTQLORA_GEMV_MMA"  # "1": plans for this kernel where a layer fits; "0": the Triton kernels; unset: `wanted`
AUTO_MIN_BATCH = 2  # unset ENV: GPTQ layers decoding batches of this many rows or more take this kernel
#   (session 19, H100, 7B 4 bit r=8: batch 8 1099 tokens/s against the Triton kernels' 837; batch 1 232 against 280)
AUTO_BITS = (2, 4)  # ... at these widths (3 bit reads 4-bit slots: correct on the CPU, not yet timed on a GPU)
UPRE_MIN_AREA = 4096 * 4096  # u once per call above this K x N; at or below, each block's share (session 19, H100,
#   4096x4096 r=8: 13.2 against 13.8 us at M = 1, 19.3 against 26.7 at M = 8; q|k|v, gate|up, down_proj the other way)
SOURCE = Path(__file__).with_name("gemv_mma.cu")
BITS = (2, 4)
MAX_R = 64  # largest LoRA rank the kernel's shared u holds
UPRE = 1  # the adapter's u = x Aᵀ by kernels/lora_u.py once per call, u Bᵀ added where the cells are stored (the
#           last split's sum). A config's "UPRE": 0 computes each split's share of u in every block instead, session
#           16's way (26 of 55 us at 4096x22016). Session 20 (H100) dropped session 17's u Bᵀ added before split 0's
#           k-steps: at M = 1 storing it was 2.3-5.6 us faster at the three shapes above 4096x4096, at M = 8 within 1 us
TAIL = 0  # 1: the last split sums 4 cells a thread at once where it has that many (M = 8 at 128 columns), 16 loads in
#          flight; 0: a cell at a time, 8 loads. Session 21 (H100, bench/results/gpu-2026-12-07-s21a): the same bits,
#          but mixed: M = 8 4096x4096 20.1 -> 17.5 us and down_proj 43.1 -> 41.2, q|k|v 31.7 -> 34.0 and gate|up
#          44.7 -> 49.3; the 7B at batch 8 1,330 against 1,370 tokens/s (0.97x). Off
TAIL_ENV = "GPTQLORA_GEMV_TAIL"  # "1" / "0" overrides TAIL (bench/decode.py's `tail` kind, for the A/B)
PDL = 1  # 1: u's launch lets this kernel start at once (programmatic dependent launch, sm_90+), which waits for u
#         only before its cells take u Bᵀ. Session 21 (H100, gpu-2026-12-07-s21a): outputs bit-equal to PDL 0 at the
#         7B shapes; per layer 0.2-2.5 us faster in 6 of 8 shape/M pairs (M = 1, 8), 0.04 and 0.3 us slower in the
#         other two; the 7B at batch 8 1,381 against 1,370 tokens/s (+0.8%, within run-to-run drift)
PDL_ENV = "GPTQLORA_GEMV_PDL"  # "1" / "0" overrides PDL (bench/decode.py's `pdl` kind, for the A/B)
NARROW = 0  # 1: batches of 2-8 rows take 8 warps x 1 tile (128 columns) with the fewest splits, the best block of the
#            probe's M = 8 grids at 3 of 4 7B shapes in sessions 19-20 (1.5-3.3 us a layer); 0: `pick_config`'s
#            M = 1 choice. Off until a 7B A/B (bench/decode.py's `narrow` kind; not yet run) says the gain holds
NARROW_ENV = "GPTQLORA_GEMV_NARROW"  # "1" / "0" overrides NARROW
SSTATS = 2  # 1: a SpQR layer's statistics decoded once per block into shared memory (a thread per group and column),
#            which lifts the 8-groups-a-split cap of statistics held per lane in registers: SpQR's 16-row groups made
#            128-row splits, 32 of them at K = 4096 and 86 at 11008; now 256 rows. Session 22 (H100, records
#            bench/results/gpu-2026-12-07-s22b): per layer 0.53-0.59x the registers' time at the 7B's shapes, M = 1, 8.
#            2: the block's raw code words and second-level values copied once (~8 loads a thread, not ~8 per
#            (group, column): ~32 K load instructions a block at the 7B's shapes), decoded from shared memory; the
#            scale kept as fp16. The default since session 24 (H200, bench/results/gpu-2026-12-07-s24): the GPU
#            checks pass and per layer it took 0.96x / 0.99x SSTATS 1's time at 4096x4096 (M = 1 / 8) and 0.86x /
#            0.86x at 4096x11008; 11008x4096 and the 7B A/B (decode.py's spqr3-mmadec, SSTATS 1) not yet run
SSTATS_ENV = "GPTQLORA_GEMV_SSTATS"  # "0" / "1" / "2" overrides SSTATS (bench/decode.py's `spqr3-mmareg`,
#                                     `spqr3-mmadec` and `spqr3-mmaraw`, for the A/B)
OPRE = 0  # 1: each column's outlier offsets read with the statistics' loads and its first 4 entries before the
#          block's barrier (two round trips to memory off each block's chain; the same sums in the same order).
#          Written after session 22 (outliers cost 2-11 us a layer there). Session 24 (H200): correct, but with
#          SSTATS 2 it took 1.12x / 1.25x the time at 4096x4096 (M = 1 / 8) and 0.99x at 4096x11008: off
OPRE_ENV = "GPTQLORA_GEMV_OPRE"  # "1" / "0" overrides OPRE (bench/decode.py's `spqr3-mmaopre` sets it with SSTATS 2)
SPQR_AUTO = 1  # unset ENV: SpQR layers decode through this kernel at every batch, one row too (session 22, H100,
#               gpu-2026-12-07-s22b/c: per layer 0.71-0.76x the Triton SpQR path's time at M = 1 and 0.09-0.10x at
#               M = 8; the 7B 3-bit SpQR + r=8 at batch 1 0.73x bf16 against the Triton path's 0.54x, batch 8 0.58x)
SMEM_LIMIT = 48 * 1024  # bytes of static shared memory a block may declare
U_LOCKS = 3  # counters past the kernel's own (`counters`) for lora_u's chunks: with PDL the two launches overlap
OSTEP = 64  # packed rows per outlier offset (`pack_outliers`; a define of gemv_mma.cu): every KC is a multiple
PACK_CHUNK = 1024  # columns packed at a time (int64 codes of K x 1024 transient)


def wanted(batch: int | None = None, bits: int | None = None) -> bool:
    """Whether layers decoding `batch` rows at a time plan for this kernel: GPTQLORA_GEMV_MMA=1 always, =0
    never; unset, where `batch` is known (inference.prepare_decode says it) and >= AUTO_MIN_BATCH, for the
    widths measured through it (`AUTO_BITS`: 3-bit layers, in 4-bit slots since session 20, only when asked)."""
    value = os.environ.get(ENV, "")
    if value in ("0", "1"):
        return value == "1"
    return batch is not None and batch >= AUTO_MIN_BATCH and (bits is None or bits in AUTO_BITS)


def wanted_spqr(device: torch.device | str | None = None) -> bool:
    """Whether SpQR layers on `device` plan for this kernel: GPTQLORA_GEMV_MMA=1 always (the CPU too: its tests
    check the plan), =0 never; unset, on CUDA (`SPQR_AUTO`)."""
    value = os.environ.get(ENV, "")
    if value in ("0", "1"):
        return value == "1"
    return bool(SPQR_AUTO) and torch.device(device or "cpu").type == "cuda"


def rows_per_load(bits: int) -> int:
    """Rows of K one lane's 16-byte load covers: 4 words of (4 / bits) 16-row mma k-steps each."""
    return 64 * (4 // bits)


def counters(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A plan's split-K counters for N = n columns, zero between calls: one per 16 columns (this kernel's
    column blocks and the Triton kernels'), then U_LOCKS for lora_u's chunks."""
    return torch.zeros(-(-n // 16) + U_LOCKS, dtype=torch.int32, device=device)


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an enum id, padding to 8, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _launch_dependent(fn, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
    """fn(grid, block, args) as torch's launcher does it, but through cuLaunchKernelEx with programmatic stream
    serialization allowed: the kernel may start before the launch before it ends (it must wait, as PDL does,
    before reading what that launch writes). Why not torch's: its launcher (cuLaunchKernel) takes no attributes."""
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library

    keep, params = [], []  # the C values and pointers to them, alive until the launch returns
    for a in args:
        v = ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else \
            ctypes.c_int(a) if isinstance(a, int) else ctypes.c_double(a)
        keep.append(v)
        params.append(ctypes.cast(ctypes.byref(v), ctypes.c_void_p))
    c_params = (ctypes.c_void_p * len(params))(*params)
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value = (1).to_bytes(4, "little") + bytes(60)  # programmaticStreamSerializationAllowed = 1
    config = _LaunchConfig(*grid, *block, 0, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                           ctypes.pointer(attr), 1)
    _check_cuda(_get_gpu_runtime_library().cuLaunchKernelEx(ctypes.byref(config), fn.func, c_params, None))


def slot_bits(bits: int) -> int | None:
    """The code width this kernel reads a layer of `bits` at: 2 and 4 as they are, 3 in 4-bit slots (as SpQR's
    codes: a third more bytes than the codes, the 4-bit path's speed); None for the rest."""
    return 4 if bits == 3 else bits if bits in BITS else None


def slot_zeros(zeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """A layer's zeros as the kernel reads them for its `slot_bits`: packed int32 zeros of a 3-bit layer repacked
    at 4 bits along N; float zeros and 2/4-bit ones as they are."""
    if zeros.is_floating_point() or slot_bits(bits) == bits:
        return zeros
    return pack_cols(unpack_cols(zeros, bits, n), slot_bits(bits))


def eligible(bits: int, k: int, n: int, group: int, float_zeros: bool = False) -> bool:
    """Whether a layer can take this kernel: 2/4 bit (packed or float zeros), N in 16-column tiles, K in whole
    loads, groups of whole 16-row k-steps (group = K for one group) that splits can hold whole or lie in."""
    del float_zeros  # both kinds: the zero comes off per group ((MAGIC_VAL + z) Σx), packed or float
    return (bits in BITS and n % 16 == 0 and k % rows_per_load(bits) == 0 and group % 16 == 0 and group > 0
            and pick_config(1, k, n, bits, group) is not None)  # a split of whole groups, or inside one


def lane_places(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For lane l (32) and code place p of its word (32 / bits): (k-step in the word, row in the k-step,
    column in the tile). Place p = 4 s + i + 4 (4 / bits) h holds fragment register i's half h of k-step s:
    register i of lane (g, t) is PTX's A elements 2i, 2i + 1, at tile column g + 8 (i & 1) and rows
    2t + h + 8 (i >> 1) of the k-step."""
    spw = 4 // bits
    per = 32 // bits
    lane = torch.arange(32)[:, None]
    p = torch.arange(per)[None, :]
    h = p // (4 * spw)
    s = (p % (4 * spw)) // 4
    i = p % 4
    g, t = lane // 4, lane % 4
    return s.expand(32, per), (2 * t + h + 8 * (i >> 1)), (g + 8 * (i & 1))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (K, N) with the rows in group order -> the kernel's layout, int32 (N/16, K/RL, 32, 4):
    [tile, load, lane, word]; word j of a load covers its k-steps j * (4 / bits) onwards."""
    k, n = codes.shape
    spw, rl = 4 // bits, rows_per_load(bits)
    s, kk, nn = lane_places(bits)  # (32, per)
    c = codes.to(torch.int64).reshape(k // rl, 4, spw, 16, n // 16, 16).permute(0, 4, 1, 2, 3, 5)
    vals = c[:, :, :, s, kk, nn]  # (K/RL, N/16, 4, 32, per)
    shifts = bits * torch.arange(32 // bits, device=codes.device)
    words = (vals << shifts).sum(-1)  # distinct bits: the sum is the OR
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.permute(1, 0, 3, 2).contiguous()  # (N/16, K/RL, 32, 4)


def pack_gptq(qweight: torch.Tensor, bits: int, perm: torch.Tensor | None, slot_bits: int | None = None) -> torch.Tensor:
    """A GPTQ qweight (K*b/32, N) -> `pack`'s layout with the rows in group order (`perm`: the packed row's
    original row, as GemvPlan's), a block of columns at a time; `slot_bits` (default `bits`): the width the
    codes are packed at (SpQR's 3-bit codes go into 4-bit slots)."""
    chunks = []
    for c in range(0, qweight.shape[1], PACK_CHUNK):
        codes = unpack_rows(qweight[:, c:c + PACK_CHUNK], bits)
        chunks.append(pack(codes[perm.long()] if perm is not None else codes, slot_bits or bits))
    return torch.cat(chunks, dim=0)


def unpack_codes(frag: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes (K, N) in group order back out of `frag`, read as the kernel reads them: register i of
    k-step s is (word >> bits (4 s + i)) & mask per 16-bit half, and PTX's m16n8k16 A table (written out
    below, not derived from `lane_places`) says which matrix element each half is."""
    nt, kl, _, _ = frag.shape
    spw, per = 4 // bits, 32 // bits
    words = frag.to(torch.int64) & 0xFFFFFFFF  # (N/16, K/RL, 32, 4)
    out = torch.zeros(kl, 4, spw, 16, nt, 16, dtype=torch.int64, device=frag.device)
    ptx_a = {0: (0, 0), 1: (0, 1), 2: (8, 0), 3: (8, 1), 4: (0, 8), 5: (0, 9), 6: (8, 8), 7: (8, 9)}  # e: (row+, col+)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for s in range(spw):
            for i in range(4):
                reg = words[:, :, lane, :] >> (bits * (4 * s + i))  # (N/16, K/RL, 4)
                for h in range(2):
                    code = (reg >> (16 * h)) & (2**bits - 1)
                    dr, dc = ptx_a[2 * i + h]  # A element 2i + h: row g + dr (output column), col 2t + dc (k)
                    out[:, :, s, 2 * t + dc, :, g + dr] = code.permute(1, 2, 0)
    del per
    return out.reshape(kl * 4 * spw * 16, nt * 16)


def emulate(x: torch.Tensor, frag: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
            perm: torch.Tensor | None, lora_a=None, lora_b=None, scaling: float = 1.0, outliers=None) -> torch.Tensor:
    """The kernel's result in fp32 torch (q - z exact, fp32 sums, scale per group), rounded once to x's dtype:
    the CPU tests' stand-in for the GPU."""
    codes = unpack_codes(frag, bits).float()  # (K, N) group order
    k, n = codes.shape
    zq = unpack_rows(zeros.t().contiguous(), bits).t().float() if not zeros.is_floating_point() else zeros.float()
    grp = torch.arange(k, device=codes.device) // group
    w = (codes - zq[grp, :n]) * scales.float()[grp]
    xs = x.float()[:, perm.long()] if perm is not None else x.float()
    y = xs @ w
    if lora_a is not None:
        y = y + scaling * (x.float() @ lora_a.float().t()) @ lora_b.float().t()
    if outliers is not None:  # `pack_outliers`': values, packed-row positions, row pointers (, offsets)
        vals, pos, rows = outliers[:3]
        y = y.index_add(1, csr_rows(rows, vals.shape[0]), xs[:, pos.long()] * vals.float())
    return y.to(x.dtype)


def pack_outliers(vals: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, perm: torch.Tensor | None,
                  k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SpQR's CSR outliers over W (N, K) (fp16 values, int16 x rows, int32 row pointers) in the kernel's order:
    each row's entries by packed-row position (where `perm` puts their x row; the x row without one), and per
    row, the int16 offset past its start of its first entry at or past every OSTEP packed rows. A split of KC
    rows (a multiple of OSTEP) then finds its own entries in two reads and reads their x from shared memory.
    -> (values, positions int16, row pointers, offsets (N, K / OSTEP + 1) int16)."""
    if k % OSTEP or k > 2**15 - 1:
        raise ValueError(f"gemv_mma's outliers need K a multiple of {OSTEP} below 2^15, got {k}")
    n, row = rows.numel() - 1, csr_rows(rows, vals.numel())
    pos = cols.long() if perm is None else torch.argsort(perm.long())[cols.long()]
    key = row * k + pos  # (nnz,): unique (a column holds one outlier per row), rows stay in order
    key, order = torch.sort(key)
    steps = torch.arange(0, k + 1, OSTEP, device=rows.device)  # (K / OSTEP + 1,)
    first = torch.searchsorted(key, torch.arange(n, device=rows.device)[:, None] * k + steps[None, :])  # (N, S + 1)
    offs = (first - rows[:-1, None].long()).to(torch.int16)
    return vals[order].half(), (key % k).to(torch.int16), rows, offs.contiguous()  # the kernel reads fp16 bits


def _split_fits(k: int, kc: int, group: int, staged: bool = False) -> bool:
    """KC rows a split can be: a divisor of K, whole groups or inside one, at most 8 groups where their
    statistics are held in registers (`staged`: in shared memory, bounded by `smem_bytes` instead)."""
    return k % kc == 0 and (kc % group == 0 or group % kc == 0) and (staged or kc // min(kc, group) <= 8)


def smem_bytes(cols: int, kc: int, group: int, nm: int, staged: int, stat_bits: int = 8, stat_group: int = 1) -> int:
    """A variant's static shared memory at most (the adapter's share of u and the outliers' sums counted):
    x rows (+8 halves a row), u, Σx per group, the outliers' sums, and with `staged` (SSTATS) each group's scale
    and zero per column (1: both fp32; 2: an fp16 scale, plus the block's raw second-level values and code
    words at `stat_bits`, `stat_group` columns to a second-level entry)."""
    rows, ngroup = nm * 8, kc // min(kc, group)
    base = rows * (kc + 8) * 2 + rows * MAX_R * 4 + rows * ngroup * 4 + rows * cols * 4
    if staged == 2:
        return base + 6 * ngroup * cols + 8 * ngroup * (cols // stat_group + 2) + 8 * ngroup * (cols * stat_bits // 32 + 2)
    return base + (8 * ngroup * cols if staged else 0)


def sstats() -> int:
    """SpQR's statistics mode (SSTATS), or GPTQLORA_GEMV_SSTATS where it says 0, 1 or 2."""
    value = os.environ.get(SSTATS_ENV, "")
    return int(value) if value in ("0", "1", "2") else SSTATS


def _aligned(bounds: tuple[int, int] | None, cols: int) -> bool:
    """Whether blocks of `cols` columns stay inside one sibling projection of `bounds`."""
    return bounds is None or not (bounds[0] % cols or bounds[1] % cols)


def pick_config(m: int, k: int, n: int, bits: int, group: int, sms: int = 132,
                bounds: tuple[int, int] | None = None, staged: int = 0, stat_bits: int = 8,
                stat_group: int = 1) -> dict | None:
    """Block shape for a call, or None when none fits: WARPS x NT 16-column tiles per block (a block inside
    one sibling projection), KC rows per split (a divisor of K in whole loads, whole groups or inside one, at
    most 8 groups and 8 loads a tile in registers). 8 warps and 256 rows per split where that makes a block
    per SM or more (the fastest of session 16's grid on an H100 at M = 1, every 7B shape, 2 and 4 bit), else
    the most blocks up to ~4 per SM with the fewest splits. `staged`: the statistics in shared memory (SSTATS 1
    or 2, SpQR's layers of `stat_bits` codes, `stat_group` columns a second-level entry), any number of groups a
    split that `SMEM_LIMIT` holds."""
    rl = rows_per_load(bits)
    upre = UPRE if k * n > UPRE_MIN_AREA else 0
    nm = 1 if m <= 8 else 2
    extra = dict(SSTATS=int(staged)) if staged else {}

    def fits(kc: int, cols: int) -> bool:
        return _split_fits(k, kc, group, bool(staged)) and (
            not staged or smem_bytes(cols, kc, group, nm, staged, stat_bits, stat_group) <= SMEM_LIMIT)

    if 1 < m <= 8 and _flag(NARROW_ENV, NARROW) and _aligned(bounds, 128):
        kc = next((rl * loads for loads in (8, 4, 2, 1) if fits(rl * loads, 128)), None)
        if kc is not None:  # the fewest splits: the largest KC that fits
            return dict(WARPS=8, NT=1, KC=kc, NM=1, UPRE=upre, **extra)
    for warps, nt in ((8, 2), (8, 1), (4, 2), (4, 1), (2, 1), (1, 1)):
        cols = warps * nt * 16
        if not _aligned(bounds, cols):
            continue
        best = None
        for loads in (8, 4, 2, 1):
            kc = rl * loads
            if not fits(kc, cols) or nt * loads > 8:
                continue
            blocks = -(-n // cols) * (k // kc)
            score = (kc == 256 and blocks >= sms, blocks >= 2 * sms, -abs(blocks - 4 * sms))
            if best is None or score > best[0]:
                best = (score, kc)
        if best is not None:
            return dict(WARPS=warps, NT=nt, KC=best[1], NM=nm, UPRE=upre, **extra)
    return None


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    """NVRTC as PyTorch finds it (loaded by name), else from an nvidia-cuda-nvrtc wheel in site-packages (the
    CPU tests compile the source with it: the test extra installs one). OSError when there is none."""
    import glob
    import site

    if torch.version.cuda:
        from torch.cuda._utils import _get_gpu_rtc_library

        try:
            return _get_gpu_rtc_library()
        except OSError:
            pass
    major = torch.version.cuda.split(".")[0] if torch.version.cuda else ""
    for d in site.getsitepackages() + [site.getusersitepackages()]:
        for lib in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", f"libnvrtc.so.{major}*")), reverse=True):
            if "alt" not in os.path.basename(lib) and "builtins" not in os.path.basename(lib):
                return ctypes.CDLL(lib)
    raise OSError("no NVRTC library found (PyTorch's CUDA wheels ship one; pip install nvidia-cuda-nvrtc)")


def ptx(consts: tuple[tuple[str, int], ...], arch: str) -> bytes:
    """The PTX of one kernel variant (`defines`) for `arch` ("sm_90")."""
    return _nvrtc_ptx("".join(f"#define {k} {v}\n" for k, v in consts) + SOURCE.read_text(), arch)


@functools.cache
def usable(device: torch.device) -> bool:
    """Whether the kernel compiles and loads on `device` (tensor cores of sm_80 or newer, NVRTC found); warns
    once and says no otherwise, so the layers plan for the Triton kernels instead."""
    try:
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False
        cfg = {"WARPS": 4, "NT": 2, "KC": 256, "NM": 1, "PDL": 0}
        kernel(defines(cfg, 4, 128, torch.bfloat16, torch.float16, True, torch.float32), _arch(device))
        return True
    except Exception as e:  # noqa: BLE001 - any failure to build or load: the Triton kernels decode instead
        import warnings

        warnings.warn(f"the tensor-core decode kernel is unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      f"decoding through the Triton kernels", stacklevel=2)
        return False


def _nvrtc_ptx(source: str, arch: str) -> bytes:
    """PTX of `source` by NVRTC (PyTorch's CUDA wheels ship it). The source includes no header, so no CUDA
    toolkit is needed, which torch.cuda._compile_kernel's include search (CUDA_HOME) would ask for."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"gemv_mma.cu", 0, None, None):
        raise RuntimeError("NVRTC could not create the gemv_mma program")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    if res:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC failed on gemv_mma.cu: {log.value.decode(errors='replace')}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value


def defines(cfg: dict, bits: int, group: int, x_dtype: torch.dtype, s_dtype: torch.dtype, has_perm: bool,
            lora_dtype: torch.dtype | None, float_zeros: bool = False,
            outliers: bool = False, stat_bits: int = 0, stat_group: int = 1) -> tuple[tuple[str, int], ...]:
    """The compile-time constants of one kernel variant (`stat_bits` > 0: SpQR's statistics decoded in the
    kernel from their codes, `stat_group` columns to a second-level group)."""
    gsteps = min(group, cfg["KC"]) // 16
    return (("BITS", bits), ("XF16", int(x_dtype == torch.float16)), ("SF16", int(s_dtype == torch.float16)),
            ("NM", cfg["NM"]), ("NT", cfg["NT"]), ("WARPS", cfg["WARPS"]), ("KC", cfg["KC"]), ("GSTEPS", gsteps),
            ("HAS_PERM", int(has_perm)), ("HAS_LORA", int(lora_dtype is not None)),
            ("LORA_F32", int(lora_dtype == torch.float32)), ("MAX_R", MAX_R),
            ("FZ", int(float_zeros and not stat_bits)),
            ("SB", stat_bits), ("SG", stat_group if stat_bits else 1), ("OSTEP", OSTEP),
            ("OUTLIERS", int(outliers)), ("UPRE", int(lora_dtype is not None and cfg.get("UPRE", UPRE))),
            ("TAIL", cfg.get("TAIL", _flag(TAIL_ENV, TAIL))),
            ("SSTATS", cfg.get("SSTATS", 0) if stat_bits else min(cfg.get("SSTATS", 0), 1)),
            ("OPRE", int(outliers and bool(cfg.get("OPRE", _flag(OPRE_ENV, OPRE))))),
            ("PDL", int(lora_dtype is not None and bool(cfg.get("UPRE", UPRE))
                        and bool(cfg.get("PDL", _flag(PDL_ENV, PDL))))))


def _flag(env: str, default: int) -> int:
    """`default`, or the environment variable `env` where it says "0" or "1"."""
    value = os.environ.get(env, "")
    return int(value) if value in ("0", "1") else default


@functools.cache
def kernel(consts: tuple[tuple[str, int], ...], arch: str):
    """The compiled variant (cached per process)."""
    from torch.cuda._utils import _cuda_load_module

    return _cuda_load_module(ptx(consts, arch), ["gemv_mma"])["gemv_mma"]


@functools.cache
def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def takes(x: torch.Tensor, scales: torch.Tensor, lora_a, lora_b) -> bool:
    """Whether a call on a layer planned for this kernel can run it: CUDA, fp16/bf16 x and scales, M <= 16,
    and an adapter of rank <= MAX_R in fp32 or x's dtype (otherwise the caller's dense fallback runs)."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16) or x.shape[0] > 16:
        return False  # (the card's tensor cores were checked when the layer was planned: `usable`)
    if scales.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not lora_a:
        return True
    dt = {t.dtype for t in list(lora_a) + list(lora_b)}
    return len(dt) == 1 and dt <= {torch.float32, x.dtype} and lora_b[0].shape[1] <= MAX_R


def gemv_mma(x: torch.Tensor, frag: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
             perm: torch.Tensor | None, locks: torch.Tensor, lora_a: list[torch.Tensor] | None = None,
             lora_b: list[torch.Tensor] | None = None, scaling: float = 1.0,
             bounds: tuple[int, int] | None = None, sms: int = 132, config: dict | None = None,
             outliers: tuple[torch.Tensor, ...] | None = None,
             stats: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """x (M, K), M <= 16 -> (M, N) in x's dtype. `frag` from `pack_gptq`; zeros packed int32 (G, N*b/32) or
    float32 (G, N), scales (G, N); `perm` the packed rows' x rows (act-order) or None; `locks` >= N/16 int32
    zeros (left zero). `lora_a`/`lora_b`: lists, one (A, B) per projection of `bounds` (siblings side by
    side) or one. `outliers`: SpQR's outliers over W (N, K) as `pack_outliers` orders them, added in the same
    launch, each split its own rows'. `stats`: (fp16 (4, G, S) scales' step and base, zeros' step and base;
    stat bits) of a SpQR layer, whose `scales` and `zeros` are then its SB-bit codes packed along N, decoded in
    the kernel."""
    m, k = x.shape
    n = frag.shape[0] * 16
    sb, sg = (stats[1], n // stats[0].shape[-1]) if stats is not None else (0, 1)
    staged = sstats() if stats is not None else 0
    cfg = config or pick_config(m, k, n, bits, group, sms, bounds, staged, sb, sg)
    if cfg is None:
        raise ValueError(f"no gemv_mma block fits K={k}, N={n}, group {group}, bounds {bounds}")
    from gptqlora.kernels.gemv_m1 import lora_slots  # here, not at the top: gemv_m1 needs triton, CPU users of
    # this module (the layout, SpQRLinear's plan) do not; this runs on CUDA only

    a_s, b_s, r, has_lora = lora_slots(lora_a, lora_b, x, bounds, n)
    has_out = outliers is not None and outliers[0].shape[0] > 0
    if zeros.is_floating_point() and zeros.dtype != torch.float32:
        zeros = zeros.float()
    if locks.numel() < -(-n // 16) + U_LOCKS or int(_arch(x.device)[3:]) < 90:
        cfg = dict(cfg, PDL=0)  # no spare counters for lora_u (a plan not from `counters`) or no PDL on this card
    consts = defines(cfg, bits, group, x.dtype, scales.dtype, perm is not None, a_s[0].dtype if has_lora else None,
                     zeros.is_floating_point(), has_out, sb, sg)
    pdl = bool(dict(consts)["PDL"])
    fn = kernel(consts, _arch(x.device))
    x = x.contiguous()
    if dict(consts)["UPRE"]:  # u (M, r) fp32 in each A's place; with PDL its counters are the spare ones
        from gptqlora.kernels.lora_u import u_slots

        a_s = u_slots(x, a_s, bounds, n, locks[-U_LOCKS:] if pdl else locks, pdl=pdl)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = k // cfg["KC"]
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    cols = cfg["WARPS"] * cfg["NT"] * 16
    n1, n2 = bounds if bounds is not None else (n, n)
    args = [frag, x, perm if perm is not None else locks, scales, zeros, a_s[0], b_s[0], a_s[1], b_s[1], a_s[2],
            b_s[2], out, part, locks, *(outliers if has_out else (locks,) * 4),
            stats[0] if stats is not None else locks, m, k, n, n1, n2, r, group, float(scaling), split]
    grid, block = (-(-n // cols), split, 1), (cfg["WARPS"] * 32, 1, 1)
    if pdl:
        _launch_dependent(fn, grid, block, args)
    else:
        fn(grid=grid, block=block, args=args)
    return out


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@torch.library.custom_op("gptqlora::gemv_mma", mutates_args=())
def _gemv_mma_op(x: torch.Tensor, frag: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 perm: torch.Tensor | None, locks: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                 bits: int, group: int, scaling: float, outliers: list[torch.Tensor], stats: list[torch.Tensor],
                 stat_bits: int, bounds: list[int] | None = None) -> torch.Tensor:
    # gemv_mma as one opaque op (torch.compile, CUDA graphs; the counters end as they began), for the layers that
    # call it directly (SpQR's decode); QuantLinear reaches it through gptqlora::gemv. outliers: [] or
    # `pack_outliers`' four; stats: [] or SpQR's (4, G, S) step and base (`scales` and `zeros` its codes then);
    # bounds: siblings side by side (nn/spqr_siblings.py), a LoRA pair each, or None.
    return gemv_mma(x, frag, zeros, scales, bits, group, perm, locks, list(lora_a), list(lora_b), scaling,
                    sms=_sms(x.device), outliers=tuple(outliers) if outliers else None,
                    stats=(stats[0], stat_bits) if stats else None, bounds=tuple(bounds) if bounds else None)


@_gemv_mma_op.register_fake
def _(x, frag, zeros, scales, perm, locks, lora_a, lora_b, bits, group, scaling, outliers, stats, stat_bits,
      bounds=None):
    return x.new_empty((x.shape[0], frag.shape[0] * 16))
