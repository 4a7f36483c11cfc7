"""`--compile blocks`: every decoder block compiled by torch.compile (inductor) for training.

Why: at 1x2048 tokens a 7B training step is bound by the host, not the GPU (docs/benchmarks.md: a 271 ms
step around 190 ms of kernels). What is left of the host work is per block: HF's module calls, PEFT's
adapter dispatch, the sibling grouping, the LoRA weight casts, the checkpoint bookkeeping and dozens of
small elementwise launches. A compiled block runs all of that as one generated graph with its elementwise
work fused; our dequantizer stays one opaque op in it (kernels/dequant.py, `gptqlora::dequantize`) and
our autograd function is traced whole (kernels/quant_lora.py: nothing it writes lives outside the graph).

Activation checkpointing stays outside the compiled module (HF's GradientCheckpointingLayer wraps
`__call__`), so a recomputation replays the compiled forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.train.checkpointing import decoder_blocks

log = logging.getLogger(__name__)

MODES = ("auto", "none", "blocks")


def resolve_compile(mode: str, device: torch.device, offload_activations: bool = False) -> str:
    """`--compile auto` made concrete: blocks on CUDA (measured on an H200, 7B, docs/benchmarks.md: 1.35x the
    eager step at 1x2048 and the same losses; the first steps pay ~35 s of compilation), none on a CPU (the
    compilation would outlast a CPU run's steps) and with --offload_activations (its hooks cannot be
    traced)."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if device.type != "cuda" or offload_activations:
        return "none"
    return "blocks"


def compile_blocks(model: nn.Module, dynamic: bool | None = None, backend: str = "inductor") -> int:
    """Compile each decoder block of `model` in place (nn.Module.compile); the number compiled. `backend`:
    torch.compile's (the tests use "aot_eager": the same tracing, no code generation).

    The layers' kernel plans are built first: compiled code reads the plan a layer already has and cannot
    build one (it needs a host sync). Blocks of one model share their compiled code where their guards
    agree, so the recompilation limit is raised to the block count."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError("--compile blocks needs a model with decoder blocks (transformers' "
                         "GradientCheckpointingLayer, as the LLaMA family has)")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel_plan()
    cfg = torch._dynamo.config
    need = 2 * len(blocks) + 8  # worst case: an entry per block, and a dynamic-shape one for each
    for name, n in (("recompile_limit", need), ("cache_size_limit", need),  # names differ across torch versions
                    ("accumulated_recompile_limit", 8 * need), ("accumulated_cache_size_limit", 8 * need)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))
    # transformers >= 5.2x checkpoints inside a block's forward, so the compiled graph holds the checkpoint
    # (recomputation planned by the compiler). The one side effect in a block, the sibling group's held
    # outputs (adapters/siblings.py), is undone by the block's end, so its replay in the recomputation can go.
    if hasattr(cfg, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # a torch without it breaks the graph there
        cfg.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in blocks:
        block.compile(dynamic=dynamic, backend=backend)
    log.info("torch.compile: %d decoder blocks (compiled at their first call)", len(blocks))
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> int:
    """Back to eager blocks (after training: generation would recompile a training-shaped graph for every
    cache length); the number undone."""
    blocks = [b for b in decoder_blocks(model) if getattr(b, "_compiled_call_impl", None) is not None]
    for block in blocks:
        block._compiled_call_impl = None
    return len(blocks)
