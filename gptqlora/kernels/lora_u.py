"""The adapter's u = x Aᵀ for up to three sibling projections in one launch (decode: M <= 16 tokens).

    u[p] = x @ A_p.T        x (M, K), A_p (r, K) fp32 or x's dtype  ->  u (P, M, r) fp32

Why a kernel of its own: the tensor-core decode kernel (gemv_mma.cu) computed each split's share of u in every
block, ~1,400 blocks a 4096x22016 layer, and the adapter took 26 of its 55 us there (session 17, H100). Computed
once per call, the decode kernel only adds u Bᵀ where its cells are stored. Three cuBLAS calls and a stack would be four
launches per sibling group; this is one: a program per (projection, 256 rows of K), each reading its rows of
every rank of A once and x (L2-resident), its (M, r) partial summed with the others' in a fixed order by the last
program of its projection (kernels/split_k.py, as the decode kernels' splits). Session 18 (H100) measured the
first version, a program per (projection, rank) walking all of K in series: 6.7 us at K = 4096, 16.7 at 11008,
latency-bound, and with it the u-once paths lost (docs/benchmarks.md, session 18); split over K (a prototype
with atomics): 2.8-3.0 us.

Inside a program (`MODE`, `pick`): session 19's version reduced its (M, r) tile across threads at every step
(mode 0, removed after session 20's A/B), so its time grew with M: 11.3 us at M = 8 against 3.4 at M = 1,
18.5% of the 7B's batch-8 step (session 20 profile). Mode 1 sums the products elementwise and reduces once
(4.7 us at M = 8); mode 2 runs the products on tensor cores, M and r padded to 16 (5.6 us at M = 16, against
mode 1's 6.1).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gptqlora.kernels.split_k import _store_split


@triton.jit
def _dot_t(x, a, acc, F32_DOT: tl.constexpr):
    """acc + x (BM, BK) @ a (RP, BK)ᵀ on tensor cores, both 16-bit; in fp32 under Triton's interpreter, which gets
    bf16 dots wrong (the same exact products)."""
    if F32_DOT:
        return tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(a), acc)


@triton.jit
def _lora_u_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, u_ptr, part_ptr, lock_ptr, M, K, R, C,
                   BM: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr, MODE: tl.constexpr,
                   F32_DOT: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the decode kernel after this launch may start now (it waits for u before reading it: gemv_mma.PDL)
        tl.extra.cuda.gdc_launch_dependents()
    p = tl.program_id(0)  # projection
    c = tl.program_id(1)  # chunk of KC rows of K
    if p == 0:
        a_ptr = a0_ptr
    elif p == 1:
        a_ptr = a1_ptr
    else:
        a_ptr = a2_ptr
    offs_m = tl.arange(0, BM)
    offs_r = tl.arange(0, RP)
    if MODE == 1:  # products summed elementwise, one reduction at the end
        acc3 = tl.zeros((BM, RP, BK), dtype=tl.float32)
    else:  # tensor cores: (BM, BK) @ (BK, RP), BM and RP >= 16
        acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(c * KC, c * KC + KC, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & mk[None, :],
                     other=0.0)  # (BM, BK)
        a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=(offs_r[:, None] < R) & mk[None, :],
                    other=0.0)  # (RP, BK)
        if MODE == 1:
            acc3 += xt.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :]
        else:
            hi = a.to(xt.dtype)
            acc = _dot_t(xt, hi, acc, F32_DOT)
            if a.dtype == tl.float32:  # A = hi + lo, both 16-bit, x exact in 16 bits: u to ~2^-16 of fp32's
                acc = _dot_t(xt, (a - hi.to(tl.float32)).to(xt.dtype), acc, F32_DOT)
    if MODE == 1:
        acc = tl.sum(acc3, axis=2)
    m2 = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    # the chunks meet as the decode kernel's splits do: partials, a counter per projection, the last sums in order
    _store_split(acc, u_ptr + p * M * R, part_ptr + p * C * M * R, lock_ptr, p, c, offs_m, offs_r, m2, M, R, C,
                 SPLIT_K=True, BM=BM, BN=RP)


def pick(m: int) -> dict:
    """The variant for M rows (session 20, H100, r=8, the 7B's sibling groups, A fp32 and bf16, us):
    elementwise accumulation (mode 1) up to M = 8, e.g. 4.7 against session 19's 11.3 at q|k|v M = 8 (fp32
    A), within 0.1 us of the best at M = 1 and 2; tensor cores above (mode 2: 5.6 against 16.9 at M = 16).
    256 rows a program: best or within 0.3 us at every M. cuBLAS, one call a projection: 6.4-21 us. The 7B
    at batch 8: 1.29x the tokens/s of session 19's variant in the same run (docs/benchmarks.md, session 20)."""
    return dict(mode=1 if m <= 8 else 2, kc=256, warps=4)


def lora_u(x: torch.Tensor, lora_a: list[torch.Tensor], locks: torch.Tensor, mode: int | None = None,
           kc: int | None = None, bk: int | None = None, warps: int | None = None, pdl: bool = False) -> torch.Tensor:
    """x (M, K) contiguous, 1-3 A's (r, K) of one rank and dtype -> u (P, M, r) fp32. `locks`: int32 counters,
    at least one per projection, zero between calls (a decode plan's split-K counters: this launch leaves them
    as it found them, before the decode kernel that reads u). mode / kc (rows a program) / bk (rows a step) /
    warps: `pick`'s unless given (bench/lora_u_probe.py sweeps them). `pdl`: let the next launch start early
    (programmatic dependent launch, gemv_mma.PDL). u's storage holds the partials too, so they live as long as
    u does: a kernel that overlaps this one is never handed their memory."""
    m, k = x.shape
    r = lora_a[0].shape[0]
    if not 1 <= len(lora_a) <= 3 or m > 16 or any(a.shape != (r, k) for a in lora_a):
        raise ValueError(f"lora_u: 1-3 A's of shape (r, {k}) and at most 16 rows of x, got "
                         f"{[tuple(a.shape) for a in lora_a]} and {m} rows")
    if locks.numel() < len(lora_a) or locks.dtype != torch.int32:
        raise ValueError(f"lora_u: {len(lora_a)} int32 counters needed, got {locks.numel()} {locks.dtype}")
    a = [t.contiguous() for t in lora_a]
    a += [a[-1]] * (3 - len(a))
    picked = pick(m)
    mode = picked["mode"] if mode is None else mode
    kc = picked["kc"] if kc is None else kc
    warps = picked["warps"] if warps is None else warps
    bm, rp = triton.next_power_of_2(m), max(2, triton.next_power_of_2(r))
    if mode == 2:
        bm, rp = max(16, bm), max(16, rp)
    if bk is None:  # mode 1: a (BM, RP, BK) fp32 accumulator of ~4096 values (32 registers a thread at 4 warps)
        bk = min(kc, max(16, 4096 // (bm * rp))) if mode == 1 else min(kc, 128)
    chunks = triton.cdiv(k, kc)
    p = len(lora_a)
    buf = torch.empty(p * m * r * (1 + chunks), dtype=torch.float32, device=x.device)  # u, then the partials
    u, part = buf[:p * m * r].view(p, m, r), buf[p * m * r:].view(p, chunks, m, r)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    _lora_u_kernel[(p, chunks)](x.contiguous(), a[0], a[1], a[2], u, part, locks, m, k, r, chunks,
                                BM=bm, RP=rp, BK=bk, KC=kc, MODE=mode, F32_DOT=interpret, PDL=pdl and not interpret,
                                num_warps=warps)
    return u


def projections(bounds: tuple[int, int] | None, n: int) -> int:
    """How many sibling projections `bounds` (n1, n2) make of N = n columns: 1 without bounds, else 2 or 3."""
    return 1 if bounds is None else 2 + (bounds[1] < n)


def u_slots(x: torch.Tensor, a_slots: list[torch.Tensor], bounds: tuple[int, int] | None, n: int,
            locks: torch.Tensor, pdl: bool = False) -> list[torch.Tensor]:
    """The decode kernels' three A slots (gemv_m1.lora_slots', padded with the last) with each projection's
    u = x Aᵀ, (M, r) fp32, in its A's place, padded alike."""
    count = projections(bounds, n)
    u = lora_u(x, a_slots[:count], locks, pdl=pdl)
    return [u[min(p, count - 1)] for p in range(3)]


def lora_u_reference(x: torch.Tensor, lora_a: list[torch.Tensor]) -> torch.Tensor:
    """The same in torch (fp32)."""
    return torch.stack([x.float() @ a.float().t() for a in lora_a])
