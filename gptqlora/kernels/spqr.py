"""SpQR layers: the dense part dequantized with its statistics decoded, the CSR outliers added, one matmul.

    W [K, N] = dequant(codes; scale, zero decoded from their 3-bit codes) ;  W[col, row] += value (outliers)
    y = x @ W

Two implementations, equal bit for bit:
- torch (the reference; CPU): the statistics decoded by torch ops into [G, N] tensors, the GPTQ
  dequantization with float zeros, the outliers added by `index_add_` at flat indices built per call;
- Triton (CUDA, or the interpreter): one kernel dequantizes the codes and decodes each tile's statistics in
  registers (3-bit codes packed along N, fp16 step/base per second-level group: no [G, N] tensor is ever
  written), and one kernel walks the CSR rows (a program per output channel) adding each outlier into
  the dense buffer: no index tensor, no sort, no atomics (each position is added once).

Adding the outliers into the dense buffer (O(nnz)) rather than running a separate sparse matmul costs the
same for any number of tokens, and the backward pass (grad_x = grad_y @ W^T) gets the outliers for free.
Like QuantMatmul, only the packed tensors are kept for backward, which rebuilds W.

The Triton kernels are in kernels/spqr_triton.py, imported at first use (triton is optional off the GPU).
At decode sizes (at most 16 rows, no gradient) `spqr_triton.spqr_small_m` skips the dense W: the small-M GPTQ kernel
(kernels/gemv.py, SPQR mode) reads the codes and decodes each tile's statistics itself, and a CSR SpMV
kernel adds x @ outliers into its output. Two launches, ~4 bits read per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptqlora.formats.spqr import SPQR_TENSORS, csr_rows, decode_scales, decode_stats
from gptqlora.kernels.dispatch import dequantize, resolve


def unpack_along_n(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes packed along the last dim (pack_cols: [G, N*bits/32] int32) -> int32 [G, N], in a fixed number
    of vectorised ops for any bit width (the per-offset loop of unpack_cols costs 32 launches at 3 bit)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (G, W)
    bit = torch.arange(n, device=packed.device, dtype=torch.int64) * bits  # (N,)
    w, off = bit // 32, bit % 32
    lo = words[:, w] >> off
    nxt = torch.clamp(w + 1, max=words.shape[1] - 1)
    hi = torch.where(off + bits > 32, words[:, nxt] << (32 - off), torch.zeros_like(lo))
    return ((lo | hi) & (2**bits - 1)).to(torch.int32)


@dataclass
class SpQRTensors:
    """One SpQR layer's packed tensors (names and shapes: gptqlora.formats.spqr)."""

    qweight: torch.Tensor
    g_idx: torch.Tensor
    scales_code: torch.Tensor
    scales_step: torch.Tensor
    scales_base: torch.Tensor
    zeros_code: torch.Tensor
    zeros_step: torch.Tensor
    zeros_base: torch.Tensor
    outlier_values: torch.Tensor
    outlier_cols: torch.Tensor
    outlier_rows: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        # by name, not self.__dict__: torch 2.11's dynamo breaks the graph on an instance's __dict__ (the GPU
        # machine's torch; a SpQR decode step broke into 43 graphs there, session 14)
        return tuple(getattr(self, name) for name in SPQR_TENSORS)


def spqr_stats(t: SpQRTensors, stat_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First-level (scales fp16 [G, N], zeros fp32 [G, N]) decoded from their codes."""
    n = t.qweight.shape[1]
    s = decode_scales(unpack_along_n(t.scales_code, stat_bits, n), t.scales_step, t.scales_base)
    z = decode_stats(unpack_along_n(t.zeros_code, stat_bits, n), t.zeros_step, t.zeros_base)
    return s, z


def _stat_group(t: SpQRTensors) -> int:
    return t.qweight.shape[1] // t.scales_step.shape[-1]


def register_small_m() -> None:
    """Registers torch.ops.gptqlora.spqr_small_m (importing kernels/spqr_triton.py, which needs triton)."""
    from gptqlora.kernels import spqr_triton  # noqa: F401


def spqr_small_m_op(x: torch.Tensor, tensors: list[torch.Tensor], bits: int, stat_bits: int, plan: tuple,
                    lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                    scaling: float = 1.0) -> torch.Tensor:
    """spqr_triton.spqr_small_m as one op (torch.ops.gptqlora.spqr_small_m); `tensors` the layer's SpQR tensors
    in SPQR_TENSORS order (a list, not a SpQRTensors: this runs inside the compiled decode step); `plan` as
    QuantLinear.gemv_plan gives it; `lora_a`/`lora_b` (r, K) / (N, r): an adapter fused into the same launch.
    The op is registered by importing kernels.spqr_triton (`register_small_m`), done where the plan is made:
    not here, since an import inside the compiled step is one more thing torch.compile must trace."""
    read, perm, locks, rows_sorted, group = plan
    a, b = ([lora_a], [lora_b]) if lora_a is not None else ([], [])
    return torch.ops.gptqlora.spqr_small_m(x, list(tensors), bits, stat_bits, read, perm, locks, rows_sorted,
                                           group, a, b, float(scaling))


def spqr_weight(t: SpQRTensors, bits: int, stat_bits: int, dtype: torch.dtype | None = None,
                backend: str = "auto", plan=None) -> torch.Tensor:
    """Dense W [K, N] in `dtype` (default fp16): dequantized codes plus the outliers."""
    if resolve(backend, t.qweight.device) == "triton":
        from gptqlora.kernels.spqr_triton import spqr_weight_triton

        return spqr_weight_triton(t, bits, stat_bits, dtype or torch.float16, plan)
    scales, zeros = spqr_stats(t, stat_bits)
    w = dequantize(t.qweight, zeros, scales, t.g_idx, bits, dtype or torch.float16, backend, plan)  # (K, N)
    nnz = t.outlier_values.shape[0]
    if nnz:
        n = w.shape[1]
        idx = t.outlier_cols.long() * n + csr_rows(t.outlier_rows, nnz)  # flat index of W[col, row]
        w.view(-1).index_add_(0, idx, t.outlier_values.to(w.dtype))
    return w


class SpQRMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits: int, stat_bits: int, backend: str, plan, *tensors):
        ctx.meta = (bits, stat_bits, backend, plan)
        ctx.save_for_backward(*tensors)
        return x @ spqr_weight(SpQRTensors(*tensors), bits, stat_bits, x.dtype, backend, plan)  # (..., N)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            bits, stat_bits, backend, plan = ctx.meta
            w = spqr_weight(SpQRTensors(*ctx.saved_tensors), bits, stat_bits, grad_out.dtype, backend, plan)
            grad_x = grad_out @ w.t()  # (..., K)
        return (grad_x, None, None, None, None, *([None] * len(ctx.saved_tensors)))


def spqr_matmul(x: torch.Tensor, t: SpQRTensors, bits: int, stat_bits: int, backend: str = "auto",
                plan=None) -> torch.Tensor:
    """x (..., K) @ W -> (..., N) in x's dtype, differentiable in x only."""
    return SpQRMatmul.apply(x, bits, stat_bits, backend, plan, *t.as_tuple())
