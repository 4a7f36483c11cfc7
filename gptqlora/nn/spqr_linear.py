"""SpQRLinear: a frozen SpQR layer (dense low-bit codes with quantized group statistics + CSR outliers).

The second entry of the format registry: the loader, writers, merge, SVD init and the LoRA adapter type
(GPTQLoraLinear wraps it like QuantLinear) reach it through the registry only.
"""

from __future__ import annotations

import torch
from torch import nn

from gptqlora.formats.gptq import pack_rows
from gptqlora.formats.spqr import SPQR_TENSORS, SpQRSpec, average_bits, csr_from_mask, pack_stats
from gptqlora.kernels.spqr import SpQRTensors, register_small_m, spqr_matmul, spqr_small_m_op, spqr_weight
from gptqlora.kernels.dispatch import resolve
from gptqlora.kernels.gemv_mma import takes as gemv_mma_takes
from gptqlora.nn.quant_linear import QuantLinear, compute_dtype, decodes


class SpQRLinear(nn.Module):
    """y = x @ (dequant(codes) + outliers) + bias. Buffers: the SpQR tensors (gptqlora.formats.spqr), all
    frozen; the gradient flows to the input only. `kernel`: as QuantLinear's (the dense part's backend)."""

    def __init__(self, spec: SpQRSpec, buffers: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                 kernel: str = "auto") -> None:
        super().__init__()
        if spec.stat_bits is None or spec.stat_group_size is None:
            raise ValueError("SpQRLinear needs a full spec (stat_bits and stat_group_size)")
        self.spec, self.kernel = spec, kernel
        self._plan = self._plan_key = None
        self._gemv = self._gemv_key = None  # gemv_plan's cache (the decode kernel reads the dense codes)
        self._mma = self._mma_key = None  # mma_plan's cache
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.bits, self.group_size = spec.bits, spec.group_size
        self.stat_bits, self.stat_group_size = spec.stat_bits, spec.stat_group_size
        for name in SPQR_TENSORS:
            self.register_buffer(name, buffers[name])
        if bias is not None:
            self.register_buffer("bias", bias)
        else:
            self.bias = None

    infeatures = property(lambda self: self.in_features)  # what PEFT reads to size adapters
    outfeatures = property(lambda self: self.out_features)

    @property
    def nnz(self) -> int:
        return int(self.outlier_values.shape[0])

    @property
    def outlier_fraction(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    @property
    def average_bits(self) -> float:
        return average_bits(self.bits, self.group_size if self.group_size != -1 else self.in_features,
                            self.stat_bits, self.stat_group_size, self.outlier_fraction)

    @classmethod
    def from_packed(cls, spec: SpQRSpec, buffers: dict[str, torch.Tensor],
                    bias: torch.Tensor | None = None) -> "SpQRLinear":
        """From a format's `read` (whose buffers fix the statistics' sizes)."""
        n = spec.out_features
        full = SpQRSpec(spec.in_features, n, spec.bits, spec.group_size,
                        buffers["scales_code"].shape[-1] * 32 // n, n // buffers["scales_step"].shape[-1])
        return cls(full, buffers, bias)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, g_idx: torch.Tensor, group_size: int, bits: int,
                   scales_code: torch.Tensor, scales_step: torch.Tensor, scales_base: torch.Tensor,
                   zeros_code: torch.Tensor, zeros_step: torch.Tensor, zeros_base: torch.Tensor,
                   outlier_mask: torch.Tensor, outlier_residual: torch.Tensor, stat_bits: int,
                   bias: torch.Tensor | None = None) -> "SpQRLinear":
        """From a solver's unpacked result: codes [K, N], g_idx [K], stat codes [G, N] with their fp16
        second-level step/base [G, N/stat_group], outliers as a mask and residuals [N, K]."""
        k, n = codes.shape
        spec = SpQRSpec(k, n, bits, group_size, stat_bits, n // scales_step.shape[-1])
        values, cols, rows = csr_from_mask(outlier_mask.cpu(), outlier_residual.cpu())
        buffers = {"qweight": pack_rows(codes.cpu(), bits), "g_idx": g_idx.cpu().to(torch.int32),
                   "scales_code": pack_stats(scales_code.cpu(), stat_bits), "scales_step": scales_step.cpu().half(),
                   "scales_base": scales_base.cpu().half(), "zeros_code": pack_stats(zeros_code.cpu(), stat_bits),
                   "zeros_step": zeros_step.cpu().half(), "zeros_base": zeros_base.cpu().half(),
                   "outlier_values": values, "outlier_cols": cols, "outlier_rows": rows}
        return cls(spec, buffers, None if bias is None else bias.detach().cpu().to(torch.float16))

    def packed_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in SPQR_TENSORS}

    def tensors(self) -> SpQRTensors:
        return SpQRTensors(**self.packed_state())

    # the Triton kernels' row plans for g_idx (dequant) and for the decode kernel, cached as QuantLinear
    # caches them (same attributes)
    kernel_plan = QuantLinear.kernel_plan
    mma_decode = False  # the SpQR decode reads GPTQ-ordered codes with its statistics (gemv.py's SPQR mode)

    def gemv_plan(self) -> tuple | None:
        """QuantLinear.gemv_plan's plan for the codes; where there is one (the Triton path), the SpQR decode op
        is registered too, before any compiled step calls it."""
        plan = QuantLinear.gemv_plan(self)
        if plan is not None and not torch.compiler.is_compiling():
            register_small_m()
        return plan

    def mma_plan(self) -> tuple | None:
        """The tensor-core decode plan (kernels/gemv_mma.py, on CUDA unless GPTQLORA_GEMV_MMA=0, where the layer
        fits: `gemv_mma.wanted_spqr`): the codes in fragment order (3-bit codes in 4-bit slots), the statistics'
        steps and bases side by side (fp16 (4, G, S); the kernel decodes the layer's own codes) and the outliers
        in packed-row order (`gemv_mma.pack_outliers`), non-persistent buffers; (slot bits, group), or None (then
        gemv_plan's Triton path). Built once, rebuilt when any SpQR tensor changes; under torch.compile the one
        before."""
        if torch.compiler.is_compiling():
            return self._mma
        from gptqlora.kernels import gemv_mma

        key = (*((getattr(self, name).data_ptr(), getattr(self, name)._version) for name in SPQR_TENSORS),
               self.qweight.device, gemv_mma.wanted_spqr(self.qweight.device), self.kernel)  # every tensor the plan copies from
        if self._mma_key != key:
            self._mma, self._mma_key = self._build_mma(), key
        return self._mma

    def _build_mma(self) -> tuple | None:
        from gptqlora.kernels import gemv_mma
        from gptqlora.kernels.dequant import plan_for
        from gptqlora.kernels.gemv import room_for

        k, n, dev = self.in_features, self.out_features, self.qweight.device
        slot = gemv_mma.slot_bits(self.bits)  # 3-bit codes in 4-bit slots
        gs = k if self.group_size == -1 else self.group_size
        if (not gemv_mma.wanted_spqr(dev) or slot is None or not gemv_mma.eligible(slot, k, n, gs) or k % gemv_mma.OSTEP or k >= 2**15
                or k % gs or n * self.stat_bits % 32):
            return None  # (the outliers' positions and offsets are int16; whole words of statistics' codes a group)
        if dev.type == "cuda" and (resolve(self.kernel, dev) != "triton" or not gemv_mma.usable(dev)):
            return None
        rows = plan_for(self.g_idx, gs)
        nnz = self.outlier_values.shape[0]
        stats = (self.scales_step, self.scales_base, self.zeros_step, self.zeros_base)
        if rows is None or not room_for(k * n * slot // 8 + 8 * stats[0].numel() + nnz * 4 + n * (k // 32 + 2), dev):
            return None
        o_vals, o_pos, _, o_offs = gemv_mma.pack_outliers(self.outlier_values, self.outlier_cols, self.outlier_rows,
                                                          rows.perm, k)
        for name, t in (("mma_frag", gemv_mma.pack_gptq(self.qweight, self.bits, rows.perm, slot)),
                        ("mma_stats", torch.stack([t.to(torch.float16) for t in stats])), ("mma_perm", rows.perm),
                        ("mma_locks", gemv_mma.counters(n, dev)),
                        ("mma_o_vals", o_vals), ("mma_o_pos", o_pos), ("mma_o_offs", o_offs)):
            self.register_buffer(name, t, persistent=False)
        return slot, gs

    @staticmethod
    def decode_group(bases: list[SpQRLinear], x: torch.Tensor, lora_a: list[torch.Tensor],
                     lora_b: list[torch.Tensor], scaling: float) -> tuple[torch.Tensor, ...] | None:
        """Sibling layers' (q|k|v, gate|up) decode outputs from one launch, or None (nn/spqr_siblings.py)."""
        from gptqlora.nn import spqr_siblings

        return spqr_siblings.decode_group(bases, x, lora_a, lora_b, scaling)

    def small_m(self, x: torch.Tensor, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                scaling: float = 1.0) -> torch.Tensor | None:
        """y = x @ W + bias [+ scaling * (x @ Aᵀ) @ Bᵀ] without a dense W when it applies (at most 16 rows, the
        Triton path, no gradient wanted; else None; as QuantLinear.small_m): the tensor-core kernel with the
        outliers in the same launch where `mma_plan` has one (kernels.gemv_mma), else
        kernels.spqr_triton.spqr_small_m."""
        if not decodes(x, lora_a, lora_b):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        a, b = ([lora_a], [lora_b]) if lora_a is not None else ([], [])
        mma = self.mma_plan()
        if mma is not None and gemv_mma_takes(x2, self.mma_stats, a, b):
            y = torch.ops.gptqlora.gemv_mma(x2, self.mma_frag, self.zeros_code.contiguous(),
                                            self.scales_code.contiguous(), self.mma_perm,
                                            self.mma_locks, a, b, mma[0], mma[1], float(scaling),
                                            [self.mma_o_vals, self.mma_o_pos, self.outlier_rows, self.mma_o_offs],
                                            [self.mma_stats], self.stat_bits)
        else:
            plan = self.gemv_plan()
            if plan is None:
                return None
            tensors = [getattr(self, name) for name in SPQR_TENSORS]
            y = spqr_small_m_op(x2, tensors, self.bits, self.stat_bits, plan, lora_a, lora_b, scaling)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense W [K, N] (input-major, as in x @ W), outliers included."""
        return spqr_weight(self.tensors(), self.bits, self.stat_bits, dtype, self.kernel, self.kernel_plan())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        y = self.small_m(x)  # decoding
        if y is not None:
            return y
        y = spqr_matmul(x, self.tensors(), self.bits, self.stat_bits, self.kernel, self.kernel_plan())  # (..., N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, stat_bits={self.stat_bits}, stat_group_size={self.stat_group_size}, "
                f"outliers={self.nnz} ({100 * self.outlier_fraction:.2f}%), bias={self.bias is not None}")
