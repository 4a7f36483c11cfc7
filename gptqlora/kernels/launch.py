"""Launching our Triton kernels with less host work than `kernel[grid](...)`.

Why: a LLaMA-7B training step launches ~2,000 Triton kernels (dequantize and the LoRA-dropout matmuls, in
forward, recompute and backward) and at 1x2048 tokens the step is bound by the host, not the GPU
(bench/train_step.py --host-profile, H200: GPU busy 190 ms of a 500 ms step). Triton's `JITFunction.run`
rebuilds each launch's specialization from every argument, hashes it into a cache key and builds its
launch metadata before it calls the compiled launcher. Here a launch whose arguments have the same
*specialization* as an earlier one skips all that and calls the compiled kernel directly.

What Triton specializes on (so what the key must hold): for a tensor its dtype and whether its address is
16-byte aligned; for an int whether it equals 1, whether it is divisible by 16, and its width (i32, i64,
u64); floats are fp32; constexpr arguments and compile options (num_warps) by value. Our key holds exactly
these, so two launches with one key are two launches of the same compiled kernel. The first launch of a
key, the interpreter (TRITON_INTERPRET=1) and CPU tensors take Triton's own path.
GPTQLORA_FAST_LAUNCH=0 turns the shortcut off (for comparison).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

ENV = "GPTQLORA_FAST_LAUNCH"


def cdiv(a: int, b: int) -> int:
    """triton.cdiv without its cost: in Triton 3.9 `triton.cdiv` and `triton.next_power_of_2` are
    ConstexprFunctions whose host-side call takes ~5 us (they unwrap every argument); a fused layer call
    computes a dozen grids."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 for n >= 0, without its cost (see cdiv)."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def _spec(v) -> object:
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    if isinstance(v, bool):
        return "b", v
    if isinstance(v, int):
        return v == 1, v % 16 == 0, -2**31 <= v < 2**31, v < 2**63
    if isinstance(v, float):
        return "f"
    return v


class FastKernel:
    """`FastKernel(jit_fn)[grid](*args, **constexprs_and_options)`, the same call as on the jit function.

    Runtime arguments go positionally, constexprs and options (num_warps, ...) as keywords, always in one
    order per call site (the keywords' order is part of the key)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.names = getattr(fn, "arg_names", None)  # the kernel's parameters in order (JITFunction only)
        self.cache: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        x = args[0]
        if self.names is None or x.device.type != "cuda" or os.environ.get(ENV, "1") == "0":
            return self.fn[grid](*args, **kwargs)
        key = (x.device.index, tuple(kwargs.items()), *map(_spec, args))
        hit = self.cache.get(key)
        if hit is None:
            compiled = self.fn[grid](*args, **kwargs)  # Triton's own path: compiles, launches, returns it
            tail = tuple(kwargs[n] for n in self.names[len(args):])  # the constexprs, in signature order
            self.cache[key] = compiled, tail
            return compiled
        compiled, tail = hit
        if len(grid) < 3:
            grid = (*grid, 1, 1)[:3]
        try:
            compiled[grid](*args, *tail)  # on the current device's current stream, as Triton's own path
        except (AttributeError, TypeError) as e:  # a Triton whose compiled-kernel call differs: its own path
            log.warning("fast Triton launch unavailable (%s); using Triton's launch path", e)
            self.names = None
            return self.fn[grid](*args, **kwargs)
        return compiled
