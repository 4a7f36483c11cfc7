"""The Triton side of SpQR layers (kernels/spqr.py has the torch reference and the dispatch):

- `_spqr_dequant_kernel`: dense W from the codes, each tile's 3-bit statistics decoded in registers;
- `_spqr_stats_kernel`: the first-level statistics [G, N] in one launch;
- `_csr_add_kernel`: the CSR outliers added into a dense W (a program per output channel, no atomics);
- `_csr_spmv_kernel`: y += x @ outliers at decode sizes, beside the small-M GPTQ kernel in SpQR mode.

Every function here equals its torch counterpart in kernels/spqr.py bit for bit (tests/kernels/test_spqr_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptqlora.kernels.dequant import _stat_at, _unpack
from gptqlora.kernels.launch import FastKernel
from gptqlora.kernels.spqr import SpQRTensors, _stat_group


@triton.jit
def _spqr_dequant_kernel(qweight_ptr, sc_ptr, ss_ptr, sb_ptr, zc_ptr, zs_ptr, zb_ptr, rows_ptr, out_ptr,
                         K, N, GROUP, SG, BITS: tl.constexpr, SBITS: tl.constexpr, GROUPED: tl.constexpr,
                         HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W [K, N] = (q - zero) * scale with scale = fp16(base + step * code) and zero = base + step * code
    decoded here. GROUPED: a tile of BLOCK_K rows in group order shares one group (rows_ptr: the plan's
    permutation, read when HAS_PERM), so its statistics are decoded once per column; else rows_ptr is g_idx
    and each row decodes its own group's."""
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    if GROUPED:
        sorted_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = sorted_k < K
        g = (pid_k * BLOCK_K) // GROUP
        s = _stat_at(sc_ptr, ss_ptr, sb_ptr, g, offs_n, mn, N, SG, SBITS).to(tl.float16).to(tl.float32)[None, :]
        z = _stat_at(zc_ptr, zs_ptr, zb_ptr, g, offs_n, mn, N, SG, SBITS)[None, :]
        k = tl.load(rows_ptr + sorted_k, mask=mk, other=0) if HAS_PERM else sorted_k
        m2 = mk[:, None] & mn[None, :]
    else:
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = k < K
        m2 = mk[:, None] & mn[None, :]
        g = tl.load(rows_ptr + k, mask=mk, other=0)[:, None]
        s = _stat_at(sc_ptr, ss_ptr, sb_ptr, g, offs_n[None, :], m2, N, SG, SBITS).to(tl.float16).to(tl.float32)
        z = _stat_at(zc_ptr, zs_ptr, zb_ptr, g, offs_n[None, :], m2, N, SG, SBITS)
    bit_k = k * BITS
    q = _unpack(qweight_ptr, (bit_k // 32)[:, None] * N + offs_n[None, :], (bit_k % 32)[:, None], N, m2, BITS)
    w = (q.to(tl.float32) - z) * s  # fp32, rounded once, as the reference
    tl.store(out_ptr + k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _spqr_stats_kernel(sc_ptr, ss_ptr, sb_ptr, zc_ptr, zs_ptr, zb_ptr, scales_ptr, zeros_ptr, G, N, SG,
                       SBITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """First-level statistics [G, N] (scales fp16, zeros fp32) of one group per program row."""
    g, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    s = _stat_at(sc_ptr, ss_ptr, sb_ptr, g, offs_n, mn, N, SG, SBITS)
    z = _stat_at(zc_ptr, zs_ptr, zb_ptr, g, offs_n, mn, N, SG, SBITS)
    tl.store(scales_ptr + g * N + offs_n, s.to(tl.float16), mask=mn)
    tl.store(zeros_ptr + g * N + offs_n, z, mask=mn)


@triton.jit
def _csr_add_kernel(w_ptr, vals_ptr, cols_ptr, row_ptr, N, BLOCK: tl.constexpr):
    """W[col, n] += value for the outliers of output channel n = program id (CSR row n of W [N, K])."""
    n = tl.program_id(0)
    start = tl.load(row_ptr + n)
    end = tl.load(row_ptr + n + 1)
    for j in range(start, end, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        m = offs < end
        col = tl.load(cols_ptr + offs, mask=m, other=0).to(tl.int32)
        v = tl.load(vals_ptr + offs, mask=m, other=0).to(w_ptr.dtype.element_ty).to(tl.float32)
        ptr = w_ptr + col.to(tl.int64) * N + n
        old = tl.load(ptr, mask=m, other=0).to(tl.float32)
        tl.store(ptr, (old + v).to(w_ptr.dtype.element_ty), mask=m)


@triton.jit
def _csr_spmv_kernel(x_ptr, y_ptr, vals_ptr, cols_ptr, row_ptr, M, K, N, BM: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] += Σ_j x[m, col_j] * value_j over the outliers of output channel n = program id (fp32 sum,
    added to y once)."""
    n = tl.program_id(0)
    start = tl.load(row_ptr + n)
    end = tl.load(row_ptr + n + 1)
    offs_m = tl.arange(0, BM)
    mm = offs_m < M
    acc = tl.zeros((BM,), tl.float32)
    for j in range(start, end, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        m = offs < end
        col = tl.load(cols_ptr + offs, mask=m, other=0).to(tl.int32)
        v = tl.load(vals_ptr + offs, mask=m, other=0).to(tl.float32)
        xv = tl.load(x_ptr + offs_m[:, None] * K + col[None, :], mask=mm[:, None] & m[None, :], other=0)
        acc += tl.sum(xv.to(tl.float32) * v[None, :], axis=1)
    y = tl.load(y_ptr + offs_m * N + n, mask=mm, other=0).to(tl.float32)
    tl.store(y_ptr + offs_m * N + n, (y + acc).to(y_ptr.dtype.element_ty), mask=mm)


_DEQUANT, _STATS = FastKernel(_spqr_dequant_kernel), FastKernel(_spqr_stats_kernel)
_CSR_ADD, _CSR_SPMV = FastKernel(_csr_add_kernel), FastKernel(_csr_spmv_kernel)


def spqr_stats_triton(t: SpQRTensors, stat_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """spqr_stats in one Triton launch: scales fp16 [G, N], zeros fp32 [G, N]."""
    g, n = t.scales_code.shape[0], t.qweight.shape[1]
    scales = torch.empty(g, n, dtype=torch.float16, device=t.qweight.device)
    zeros = torch.empty(g, n, dtype=torch.float32, device=t.qweight.device)
    _STATS[(g, triton.cdiv(n, 256))](t.scales_code, t.scales_step, t.scales_base, t.zeros_code, t.zeros_step,
                                     t.zeros_base, scales, zeros, g, n, _stat_group(t), SBITS=stat_bits,
                                     BLOCK_N=256, num_warps=4)
    return scales, zeros


def add_outliers_triton(w: torch.Tensor, t: SpQRTensors) -> torch.Tensor:
    """W [K, N] += the CSR outliers, in place (one program per output channel)."""
    n = w.shape[1]
    if t.outlier_values.shape[0]:
        _CSR_ADD[(n,)](w, t.outlier_values, t.outlier_cols, t.outlier_rows, n, BLOCK=32, num_warps=1)
    return w


def spqr_weight_triton(t: SpQRTensors, bits: int, stat_bits: int, dtype: torch.dtype, plan=None,
                       block_n: int = 256) -> torch.Tensor:
    """Dense W [K, N] by the Triton kernels: statistics decoded in the dequant kernel, CSR outliers added."""
    from gptqlora.kernels.dequant import _block_k

    k, n = t.g_idx.shape[0], t.qweight.shape[1]
    w = torch.empty(k, n, dtype=dtype, device=t.qweight.device)
    grouped = plan is not None
    bk = _block_k(plan.group) if grouped else 16
    rows = plan.perm if grouped and plan.perm is not None else t.g_idx  # unread when grouped without a perm
    _DEQUANT[(triton.cdiv(k, bk), triton.cdiv(n, block_n))](
        t.qweight, t.scales_code, t.scales_step, t.scales_base, t.zeros_code, t.zeros_step, t.zeros_base, rows, w,
        k, n, plan.group if grouped else 1, _stat_group(t), BITS=bits, SBITS=stat_bits, GROUPED=grouped,
        HAS_PERM=grouped and plan.perm is not None, BLOCK_K=bk, BLOCK_N=block_n, num_warps=4)
    return add_outliers_triton(w, t)


def spqr_small_m(x: torch.Tensor, t: SpQRTensors, bits: int, stat_bits: int, gemv_plan,
                 lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                 scaling: float = 1.0) -> torch.Tensor:
    """x (M <= 16, K) @ W [+ scaling * (x @ Aᵀ) @ Bᵀ] -> (M, N) in x's dtype without a dense W: the small-M
    GPTQ kernel on the codes, decoding the statistics per tile (and the LoRA fused in, as for GPTQ layers),
    then the CSR SpMV of the outliers added."""
    from gptqlora.kernels.gemv import _sm_count, gemv_triton

    m, k = x.shape
    stats = (stat_bits, t.scales_code, t.scales_step, t.scales_base, t.zeros_code, t.zeros_step, t.zeros_base)
    y = gemv_triton(x, t.qweight, t.zeros_step, t.scales_step, t.g_idx, bits, gemv_plan,  # zeros, scales: unread
                    lora_a, lora_b, scaling, sms=_sm_count(x.device), spqr_stats=stats)
    if t.outlier_values.shape[0]:
        n = y.shape[1]
        _CSR_SPMV[(n,)](x.contiguous(), y, t.outlier_values, t.outlier_cols, t.outlier_rows, m, k, n,
                        BM=max(2, triton.next_power_of_2(m)), BLOCK=32, num_warps=1)
    return y


@torch.library.custom_op("gptqlora::spqr_small_m", mutates_args=())
def _spqr_small_m(x: torch.Tensor, tensors: list[torch.Tensor], bits: int, stat_bits: int, plan_qweight: torch.Tensor,
                  perm: torch.Tensor | None, locks: torch.Tensor, sorted_rows: bool, group: int,
                  lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scaling: float) -> torch.Tensor:
    # opaque to torch.compile and CUDA graphs, as gptqlora::gemv (its split-K counters end as they began);
    # lora_a, lora_b: [] (no adapter) or the one adapter's A and B
    from gptqlora.kernels.gemv import GemvPlan

    return spqr_small_m(x, SpQRTensors(*tensors), bits, stat_bits, GemvPlan(plan_qweight, perm, sorted_rows, group, locks),
                        lora_a[0] if lora_a else None, lora_b[0] if lora_b else None, scaling)


@_spqr_small_m.register_fake
def _(x, tensors, bits, stat_bits, plan_qweight, perm, locks, sorted_rows, group, lora_a, lora_b, scaling):
    return x.new_empty((x.shape[0], tensors[0].shape[1]))
