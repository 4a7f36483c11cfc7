"""Which implementation computes dequantization: the Triton kernel on CUDA, the torch reference elsewhere.
At most MAX_M tokens (decoding), the layers call `gemv`, the small-M kernel of kernels/gemv.py, instead.

The choice is per call: `backend` ("auto", "triton" or "torch"; QuantLinear's `kernel` argument) or, when
that is "auto", the GPTQLORA_KERNEL environment variable (same values). "auto" takes Triton for CUDA
tensors when Triton imports, the reference otherwise. "triton" on CPU tensors works only under Triton's
interpreter (TRITON_INTERPRET=1), which the CPU tests use.
"""

from __future__ import annotations

import os

import torch

from gptqlora.kernels import reference

BACKENDS = ("auto", "triton", "torch")
MAX_M = 16  # rows up to which the small-M kernel (kernels/gemv.py) runs; the training kernels above
ENV = "GPTQLORA_KERNEL"


_IMPORTABLE: list[bool] = []  # triton_importable's answer, once known (not functools.cache: torch.compile
# traces through a cached function and warns about it in every compiled run)


def triton_importable() -> bool:
    if not _IMPORTABLE:
        try:
            import triton  # noqa: F401
        except ImportError:
            _IMPORTABLE.append(False)
        else:
            _IMPORTABLE.append(True)
    return _IMPORTABLE[0]


def resolve(backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`."""
    choice = backend if backend != "auto" else os.environ.get(ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {choice!r} (from {ENV} or the "
                         f"QuantLinear kernel argument)")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if choice == "triton":
        if not triton_importable():
            raise RuntimeError("kernel backend 'triton' was asked for, but triton is not installed "
                               "(pip install triton, or use GPTQLORA_KERNEL=torch)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"the Triton kernels need CUDA tensors (got {device.type}); set "
                               f"TRITON_INTERPRET=1 to run them in Triton's interpreter")
    return choice


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, dtype: torch.dtype | None = None, backend: str = "auto", plan=None) -> torch.Tensor:
    """Dense W [K, N] (see reference.dequantize) by the implementation `backend` resolves to. `plan`
    (kernels.dequant.plan_for, kept by the layer) lets the Triton path take its grouped kernel."""
    if resolve(backend, qweight.device) == "triton":
        from gptqlora.kernels.dequant import dequantize_triton

        return dequantize_triton(qweight, zeros, scales, g_idx, bits, dtype, plan=plan)
    return reference.dequantize(qweight, zeros, scales, g_idx, bits, dtype)


def gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
         bits: int, plan: tuple, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
         scaling: float = 1.0, bounds: tuple[int, int] | None = None,
         ahead: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) with at most MAX_M rows -> x @ dequant(W) [+ scaling * (x @ Aᵀ) @ Bᵀ] by the small-M Triton
    kernel. `lora_a`/`lora_b`: one layer's A and B, or with `bounds` lists of each sibling's.
    `plan` = (packed weight read, perm, counters, rows sorted, group): a kernels.gemv.GemvPlan's
    fields, as QuantLinear.gemv_plan keeps them (building one imported kernels.gemv, which registered the op
    that torch.compile and CUDA graphs see as one opaque call). `bounds`: sibling projections side by side
    (kernels.gemv.gemv_triton). `ahead`: the next launch's packed weight (nn/decode_order.py), which the
    one-token kernel may ask L2 for (kernels/gemv_m1.ahead_config). No gradient."""
    read, perm, locks, rows_sorted, group = plan
    n1, n2 = bounds if bounds is not None else (-1, -1)
    a = [] if lora_a is None else list(lora_a) if isinstance(lora_a, (list, tuple)) else [lora_a]
    b = [] if lora_b is None else list(lora_b) if isinstance(lora_b, (list, tuple)) else [lora_b]
    y = torch.ops.gptqlora.gemv(x.reshape(-1, x.shape[-1]), qweight, zeros, scales, g_idx, read, perm, locks,
                                a, b, bits, group, rows_sorted, float(scaling), n1, n2, ahead)
    return y.reshape(*x.shape[:-1], y.shape[-1])
