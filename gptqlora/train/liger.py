"""Liger-Kernel's fused training ops (RMSNorm, SwiGLU, RoPE, linear + cross-entropy) on a LLaMA-family model.

We use the library rather than our own kernels: it is well kept, tested against transformers' modules,
and its fused linear + cross-entropy never materialises the fp32 logits over the vocabulary (at 4096
tokens x 32000 words that is 0.5 GB and several passes over it). Apply before wrapping with PEFT.

Liger patches transformers' LLaMA module functions (RoPE) for the whole process, besides the instance.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


def liger_importable() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def apply_liger(model: nn.Module, mode: str = "auto", blocks: bool = True) -> bool:
    """Swap in Liger's fused ops; True if applied. "auto": on a CUDA model when liger-kernel is installed
    and supports the model type; "on": the same, but an error where it cannot; "off": nothing.

    `blocks=False`: only the fused linear + cross-entropy, not the ops inside the decoder blocks. For
    compiled blocks (train/compile.py): inductor fuses RMSNorm, SwiGLU and RoPE itself, and Liger's kernels
    inside a compiled block made the 7B step slower, not faster (H200, 1x2048: 4,347 tokens/s with them
    against 7,830 without; docs/benchmarks.md)."""
    if mode not in MODES:
        raise ValueError(f"liger mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False
    reason = _why_not(model)
    if reason:
        if mode == "on":
            raise RuntimeError(f"--liger on: {reason}")
        log.info("Liger kernels not applied: %s", reason)
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    ops = dict(rope=blocks, rms_norm=blocks, swiglu=blocks, fused_linear_cross_entropy=True)
    _apply_liger_kernel_to_instance(model=model, **ops)
    log.info("Liger kernels applied (%s)", "RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy" if blocks
             else "fused linear + cross-entropy; the blocks are compiled")
    return True


def _why_not(model: nn.Module) -> str | None:
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"the model is on {device.type}; Liger's Triton kernels need CUDA"
    if not liger_importable():
        return "liger-kernel is not installed (pip install 'gptqlora[gpu]')"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for model type {model_type!r}"
    return None
