"""Activation checkpointing: full, selective (a subset of the decoder blocks), none, or auto (from free GPU
memory), optionally with the checkpointed block inputs offloaded to pinned host memory.

What a decoder block keeps for backward is measured, not assumed: `measure_block` runs one block of the
real model (its LoRA layers, dtype and autocast) on two short sequences under a saved-tensor hook and
fits bytes = a·tokens + c·tokens·seq (the second term is attention's, zero for SDPA/flash). `plan` then
keeps as many blocks un-checkpointed as fit in the free memory after the optimizer state, the loss
workspace and a margin; a checkpointed block keeps only its input, [batch, seq, hidden].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("auto", "full", "selective", "none")


@dataclass
class BlockCost:
    """Bytes a decoder block keeps for backward at `tokens` = batch x seq: per token and per token x seq."""

    per_token: float
    per_token_seq: float = 0.0

    def bytes(self, batch: int, seq: int) -> float:
        return batch * seq * (self.per_token + self.per_token_seq * seq)


@dataclass
class Plan:
    mode: str  # full | selective | none
    checkpointed: list[int]  # indices of the decoder blocks recomputed in backward
    reason: str = ""


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks HF checkpoints (GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def spread(n_layers: int, n_checkpointed: int) -> list[int]:
    """n_checkpointed block indices spread evenly over n_layers."""
    n = max(0, min(n_layers, n_checkpointed))
    return sorted({int(i * n_layers / n) for i in range(n)}) if n else []


def apply(model: nn.Module, plan: Plan, reentrant: bool = False, offload: bool = False,
          hooks: "OffloadHooks | None" = None) -> "OffloadHooks | None":
    """Checkpoint the plan's blocks (HF's per-block flag), each through `offloaded_checkpoint` if `offload`.
    Returns the offload hooks (their `offloaded_bytes` count what moved)."""
    if plan.mode == "none":
        return None
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name (the old one warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()  # frozen embeddings: reentrant checkpoints need a grad input
    blocks = decoder_blocks(model)
    chosen = set(plan.checkpointed)
    if offload and hooks is None:
        hooks = OffloadHooks(model)
    elif not offload:
        hooks = None
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i in chosen
        if hooks is not None:
            block._gradient_checkpointing_func = hooks.wrap(block._gradient_checkpointing_func)
    log.info("activation checkpointing: %s (%d of %d blocks recomputed%s)%s", plan.mode, len(chosen), len(blocks),
             ", inputs offloaded to host memory" if offload else "", f"; {plan.reason}" if plan.reason else "")
    return hooks


def plan(mode: str, n_layers: int, fraction: float = 0.5, cost: BlockCost | None = None, batch: int = 1,
         seq: int = 1, hidden: int = 1, elem_bytes: int = 2, budget_bytes: float | None = None) -> Plan:
    """Which blocks to recompute. "auto" needs `cost` and `budget_bytes` (free memory for activations);
    without them (on a CPU) it checkpoints nothing, as finetune always did there."""
    if mode not in MODES:
        raise ValueError(f"--gradient_checkpointing must be one of {MODES}, got {mode!r}")
    if mode == "full":
        return Plan("full", list(range(n_layers)))
    if mode == "none":
        return Plan("none", [])
    if mode == "selective":
        return Plan("selective", spread(n_layers, math.ceil(fraction * n_layers)))
    if cost is None or budget_bytes is None:
        return Plan("none", [], "auto: no GPU memory limit to plan for")
    full = cost.bytes(batch, seq)  # a block that keeps everything
    ckpt = batch * seq * hidden * elem_bytes  # a checkpointed block keeps its input only
    # all kept + one block's activations, recomputed in backward when anything is checkpointed
    need_none = n_layers * full
    if need_none <= budget_bytes:
        return Plan("none", [], f"auto: {need_none / 2**30:.1f} GiB of activations fit in {budget_bytes / 2**30:.1f}")
    keep = int((budget_bytes - full - n_layers * ckpt) // max(full - ckpt, 1))
    if keep <= 0:
        return Plan("full", list(range(n_layers)), f"auto: {budget_bytes / 2**30:.1f} GiB free for activations "
                    f"holds no un-checkpointed block ({full / 2**30:.2f} GiB each)")
    return Plan("selective", spread(n_layers, n_layers - keep),
                f"auto: {keep} blocks keep their activations ({full / 2**30:.2f} GiB each) in "
                f"{budget_bytes / 2**30:.1f} GiB")


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def measure_block(model: nn.Module, block: nn.Module, hidden: int, dtype: torch.dtype | None,
                  seqs: tuple[int, int] = (64, 128)) -> BlockCost:
    """What `block` (with its adapters) keeps for backward, fitted from two forward passes of one sequence
    each, on the block's own device, with autocast to `dtype` (None: no autocast). Model state (weights,
    packed buffers, LoRA weights) is not counted."""
    device = next(block.buffers(), next(block.parameters())).device
    state = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    rotary = _rotary(model)
    measured = []
    was_training = block.training
    block.train()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # training's random stream (dropout) stays as it was
        for seq in seqs:
            measured.append(_saved_bytes(block, rotary, state, seq, hidden, device, dtype))
    block.train(was_training)
    (s1, s2), (b1, b2) = seqs, measured
    # b = s·a + s²·c for one sequence: two points give a and c
    c = max(0.0, (b2 / s2 - b1 / s1) / (s2 - s1))
    a = b1 / s1 - c * s1
    return BlockCost(per_token=a, per_token_seq=c)


def _saved_bytes(block: nn.Module, rotary, state: set, seq: int, hidden: int, device: torch.device,
                 dtype: torch.dtype | None) -> int:
    """Bytes of the tensors one forward of `block` on one sequence saves for backward (not model state)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in state:
            seen[key] = t.untyped_storage().nbytes()
        return t

    h = torch.randn(1, seq, hidden, device=device, dtype=dtype or torch.float32, requires_grad=True)
    pos = torch.arange(seq, device=device)[None]
    kw = {"position_ids": pos, "position_embeddings": rotary(h, pos)} if rotary is not None else {}
    ac = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with ac, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(h, **kw)
    del out
    return sum(seen.values())


def _rotary(model: nn.Module):
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            return m
    return None


class OffloadHooks:
    """Saved-tensor hooks that keep a checkpointed block's input in pinned host memory.

    Wrapped around each checkpoint call, they see only what the checkpoint itself saves: the block input
    (inside the block, checkpoint's own hooks take over). The device-to-host copy runs on a side stream, so
    it overlaps the next blocks' forward; in backward the copy back waits on the compute stream (its cost,
    ~1 ms per 32 MB at PCIe 4 speed, is measured by bench/scale.py). Tensors smaller than `min_bytes` and
    model state stay where they are. On a CPU model nothing moves (the tensors are already in host memory).
    """

    def __init__(self, model: nn.Module, min_bytes: int = 1 << 20, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.state = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
        self.min_bytes = min_bytes
        self.devices = devices  # tests add "cpu": a host copy, to check the round trip without a GPU
        self.stream = None
        self.offloaded_bytes = 0  # total moved, for tests and the benchmark

    def wrap(self, checkpoint_func):
        def offloaded_checkpoint(function, *args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint_func(function, *args, **kwargs)

        return offloaded_checkpoint

    def pack(self, t: torch.Tensor):
        if t.device.type not in self.devices or t.untyped_storage().nbytes() < self.min_bytes or \
                _storage_key(t) in self.state:
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        if t.device.type != "cuda":
            return (t.device, t.detach().clone())
        if self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=True)
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # t's memory is not reused before the copy is done
        return (t.device, host)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        if device.type != "cuda":
            return host
        torch.cuda.current_stream(device).wait_stream(self.stream)  # the offload copy finished
        return host.to(device, non_blocking=True)


def auto_budget(model: nn.Module, device: torch.device, trainable: int, optim: str, vocab: int,
                loss_tokens: int, margin: float = 0.1) -> float | None:
    """Bytes free for activations on `device` (None off CUDA): free device memory, less gradients and
    optimizer state of the `trainable` parameters, the loss workspace (`loss_tokens` x vocab fp32 logits,
    their gradient and the bf16 copy), two dense dequantized weights of the largest packed layer (forward
    and backward transients) and `margin` of the total for fragmentation and kernel workspaces."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch
    state_bytes = trainable * (4 + (2 if optim == "paged_adamw_8bit" else 8))  # fp32 grad + Adam moments
    loss = loss_tokens * vocab * (4 + 4 + 2)
    largest = max((m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight")), default=0)
    return free - state_bytes - loss - 2 * 2 * largest - margin * total


def resolve_mode(use_gradient_checkpointing: bool, mode: str) -> str:
    """--use_gradient_checkpointing (the research scripts' flag) means full, unless --gradient_checkpointing
    names another mode: the explicit mode wins (a research command line plus `--gradient_checkpointing none`
    trains without recomputation)."""
    if not use_gradient_checkpointing or mode == "full":
        return mode
    if mode == "auto":
        return "full"
    log.warning("--use_gradient_checkpointing and --gradient_checkpointing %s: using %s", mode, mode)
    return mode


def setup(model: nn.Module, mode: str, *, fraction: float, batch: int, seq: int, dtype: torch.dtype | None,
          optim: str, reentrant: bool = False, offload: bool = False) -> Plan:
    """Plan (measuring a block for "auto" on a GPU) and apply checkpointing to a PEFT-wrapped HF model."""
    cfg = model.config
    blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    cost = budget = None
    if mode == "auto" and device.type == "cuda":
        cost = measure_block(model, blocks[0], cfg.hidden_size, dtype)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        budget = auto_budget(model, device, trainable, optim, cfg.vocab_size, min(batch * seq, 1024))
    elem = 4 if dtype is None and next(model.parameters()).dtype == torch.float32 else 2
    p = plan(mode, len(blocks), fraction, cost, batch, seq, cfg.hidden_size, elem, budget)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply(base, p, reentrant, offload)
    if offload and p.mode == "none":
        log.warning("--offload_activations has nothing to offload: no block is checkpointed")
    return p
