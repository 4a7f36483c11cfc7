"""QuantLinear: a frozen GPTQ-packed linear layer (the base that LoRA adapters wrap)."""

from __future__ import annotations

import torch
from torch import nn

from gptqlora.formats.gptq import GPTQSpec, pack_cols, pack_rows, unpack_zeros
from gptqlora.kernels.autograd import quant_matmul
from gptqlora.kernels.dispatch import MAX_M, dequantize, gemv, resolve


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: the autocast dtype when autocast is on, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def decodes(x: torch.Tensor, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None) -> bool:
    """Whether a call may take a decode kernel (`small_m` of the packed layers): at most MAX_M rows, and no
    gradient wanted of x or of the adapter's A and B (the decode kernels have no backward)."""
    return x.numel() <= MAX_M * x.shape[-1] and not (torch.is_grad_enabled() and (
        x.requires_grad or (lora_a is not None and (lora_a.requires_grad or lora_b.requires_grad))))


class QuantLinear(nn.Module):
    """y = x @ dequant(W) + bias, with W packed in the GPTQ layout (zeros held as v2, true zeros).

    Buffers: qweight int32 [K*b/32, N], qzeros [G, N*b/32] int32 (packed true zeros) or [G, N] float32
    (float zeros of an exact QA-LoRA merge), scales fp16 [G, N], g_idx int32 [K], bias [N] (optional).
    Nothing here is trainable; the gradient flows to the input only.
    `kernel` picks the dequantization backend (gptqlora.kernels.dispatch): "auto" runs the Triton kernel on
    CUDA and the torch reference elsewhere; the GPTQLORA_KERNEL environment variable overrides "auto".
    """

    mma_decode = True  # decode through kernels/gemv_mma.py's copy where gemv_mma.wanted and the layer fits
    decode_batch: int | None = None  # the most rows decoded at a time that inference.prepare_decode was told of
    decode_ahead: torch.Tensor | None = None  # the packed weight the next decode launch reads (nn/decode_order.py)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float16,
                 float_zeros: bool = False, kernel: str = "auto") -> None:
        super().__init__()
        self.kernel = kernel  # dequantization backend: "auto" (Triton on CUDA), "triton" or "torch"
        self._plan = self._plan_key = None  # kernel_plan's cache
        self._gemv = self._gemv_key = None  # gemv_plan's cache
        self.spec = GPTQSpec(in_features, out_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        shapes = self.spec.shapes()
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        zeros = torch.zeros(shapes["scales"], dtype=torch.float32, device=device) if float_zeros else \
            torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device)
        self.register_buffer("qzeros", zeros)
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=torch.float16, device=device))
        self.register_buffer("g_idx", self.spec.default_g_idx().to(device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    # AutoGPTQ-era names, which PEFT reads to size adapters without warning about an unknown layer type
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense W [K, N] (input-major, as in x @ W)."""
        return dequantize(self.qweight, self.zero_points, self.scales, self.g_idx, self.bits, dtype, self.kernel,
                          self.kernel_plan())

    def kernel_plan(self):
        """The Triton kernel's row plan for this layer's g_idx (None on the torch path), computed once and
        recomputed only when g_idx is replaced or changed in place; under torch.compile the plan built
        before is used (`prepare_plans`)."""
        if torch.compiler.is_compiling():
            return self._plan
        if resolve(self.kernel, self.g_idx.device) != "triton":
            return None
        key = (self.g_idx.data_ptr(), self.g_idx._version, self.g_idx.device)
        if self._plan_key != key:
            from gptqlora.kernels.dequant import plan_for

            self._plan, self._plan_key = plan_for(self.g_idx, self.group_size), key
        return self._plan

    def gemv_plan(self) -> tuple | None:
        """The decode kernel's plan (kernels/gemv.py; None off the Triton path): (packed weight it reads, perm,
        split-K counters, rows sorted, group). Built at the first small-M call and rebuilt when qweight or
        g_idx change; under torch.compile the plan built before is used. An act-order layer's copy of qweight
        with the rows in group order, perm and the counters are non-persistent buffers: static addresses for
        CUDA graphs, moved with the layer, never saved."""
        if not torch.compiler.is_compiling():
            if resolve(self.kernel, self.qweight.device) != "triton":
                return None
            from gptqlora.kernels import gemv_mma

            mma = self.mma_decode and gemv_mma.wanted(self.decode_batch, self.bits)
            zeros = self.qzeros if mma else None  # copied for a 3-bit layer's slots (SpQRLinear, which borrows
            # this method, has no qzeros and never plans that copy)
            key = (self.qweight.data_ptr(), self.qweight._version, self.g_idx.data_ptr(), self.g_idx._version,
                   None if zeros is None else (zeros.data_ptr(), zeros._version), self.qweight.device, mma)
            if self._gemv_key != key:
                from gptqlora.kernels.gemv import plan_gemv

                plan = plan_gemv(self.qweight, self.g_idx, self.bits, self.group_size, mma=mma,
                                 float_zeros=mma and self.float_zeros)
                copy = plan.qweight if plan.qweight is not self.qweight else None
                self.register_buffer("gemv_qweight", copy, persistent=False)
                self.register_buffer("gemv_perm", plan.perm, persistent=False)
                self.register_buffer("gemv_locks", plan.locks, persistent=False)
                slot = plan.qweight.dim() == 4 and gemv_mma.slot_bits(self.bits) != self.bits  # 3 bit in 4-bit slots
                self.register_buffer("gemv_zeros", gemv_mma.slot_zeros(self.qzeros, self.bits, self.out_features)
                                     if slot else None, persistent=False)
                self._gemv, self._gemv_key = (plan.sorted, plan.group), key
        if self._gemv is None:
            return None
        qweight = self.gemv_qweight if self.gemv_qweight is not None else self.qweight
        return (qweight, self.gemv_perm, self.gemv_locks, *self._gemv)

    def small_m(self, x: torch.Tensor, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                scaling: float = 1.0) -> torch.Tensor | None:
        """y = x @ W + bias [+ scaling * (x @ Aᵀ) @ Bᵀ] by the decode kernel when it applies (at most 16 rows
        of x in the compute dtype, the Triton path, no gradient wanted), else None."""
        if not decodes(x, lora_a, lora_b):
            return None
        plan = self.gemv_plan()
        if plan is None:
            return None
        y = gemv(x, self.qweight, self.decode_zeros, self.scales, self.g_idx, self.bits, plan, lora_a, lora_b,
                 scaling, ahead=self.decode_ahead)  # (..., N)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def zero_points(self) -> torch.Tensor:
        """The zeros as the kernels take them: packed int32 [G, N*b/32], or float [G, N]."""
        return self.qzeros

    @property
    def decode_zeros(self) -> torch.Tensor:
        """The zeros as the decode plan reads them (`gemv_plan`): a 3-bit layer planned for the tensor-core
        kernel reads its codes and zeros in 4-bit slots (`gemv_zeros`); every other layer, `zero_points`."""
        slots = getattr(self, "gemv_zeros", None)
        return slots if slots is not None else self.zero_points

    @property
    def float_zeros(self) -> bool:
        return self.qzeros.is_floating_point()

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                   group_size: int, bits: int, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from unpacked codes [K, N], scales [G, N], true zeros [G, N], g_idx [K]."""
        k, n = codes.shape
        layer = cls(k, n, bits, group_size, bias=bias is not None, device="cpu")
        layer.qweight = pack_rows(codes.cpu(), bits)
        layer.qzeros = pack_cols(zeros.cpu(), bits)
        layer.scales = scales.detach().cpu().to(torch.float16)
        layer.g_idx = g_idx.cpu().to(torch.int32)
        if bias is not None:
            layer.bias = bias.detach().cpu().to(torch.float16)
        return layer

    @classmethod
    def from_packed(cls, spec: GPTQSpec, buffers: dict[str, torch.Tensor],
                    bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from in-memory buffers (qweight, qzeros, scales, g_idx), as a format's `read` gives them."""
        layer = cls(spec.in_features, spec.out_features, spec.bits, spec.group_size, bias=bias is not None,
                    device="meta", float_zeros=buffers["qzeros"].is_floating_point())
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(layer, name, buffers[name])
        if bias is not None:
            layer.bias = bias
        return layer

    def packed_state(self) -> dict[str, torch.Tensor]:
        """The packed buffers (no bias), for a format's `write`."""
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    @torch.no_grad()
    def round_to_grid(self, target: torch.Tensor) -> None:
        """Set the codes that best fit target [N, K] on this layer's fixed grid (scales, zeros, g_idx)."""
        g = self.g_idx.long()
        z = unpack_zeros(self.qzeros, self.bits).float()[g]  # (K, N)
        s = self.scales.float()[g]  # (K, N)
        q = torch.clamp(torch.round(target.t().float() / s + z), 0, 2**self.bits - 1)
        self.qweight.copy_(pack_rows(q.to(torch.int64), self.bits).to(self.qweight.device))

    @torch.no_grad()
    def fold_into_zeros(self, delta: torch.Tensor) -> None:
        """Add a weight update constant within each group, exactly: s·(q - z) + d = s·(q - (z - d/s)).

        `delta` is [N, K] and constant over each group's inputs (a QA-LoRA update of this group size); it
        needs the trivial group map (no act-order). The zeros become floats [G, N].
        """
        gs = self.in_features if self.group_size == -1 else self.group_size
        if not torch.equal(self.g_idx.cpu(), self.spec.default_g_idx()):
            raise ValueError("an exact fold into the zeros needs the trivial group map (no act-order)")
        d = delta.t()[::gs].to(self.scales.device, torch.float32)  # (G, N)
        self.qzeros = unpack_zeros(self.qzeros, self.bits).float() - d / self.scales.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        y = self.small_m(x)  # decoding: the small-M kernel
        if y is not None:
            return y
        y = quant_matmul(x, self.qweight, self.zero_points, self.scales, self.g_idx, self.bits,
                         self.kernel, self.kernel_plan())  # (..., N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
