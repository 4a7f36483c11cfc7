"""Sibling projections (q/k/v, gate/up) computed by one fused call.

LLaMA-family blocks call `q_proj(h)`, `k_proj(h)`, `v_proj(h)` one after another on the same tensor `h`
(and `gate_proj(x)`, `up_proj(x)` in the MLP). When all of them are GPTQ-LoRA layers on the fused path,
the first one called computes every sibling's output in one autograd node (kernels/quant_lora.py:
one dropout pass over x for all LoRA inputs, one backward) and holds the others' outputs until they are
asked for with the same input. Nothing about the model's code changes: if a sibling is called with another
input, or an output is never asked for, the group falls back to layer-by-layer calls for good.

    link_siblings(peft_model)      # gptqlora.get_peft_model and load_adapter call it
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class SiblingGroup:
    """Layers under one parent that read the same input. Not an nn.Module: it must not appear in
    `model.modules()` or the state dict."""

    def __init__(self, layers: list[nn.Module], names: list[str]) -> None:
        self.layers, self.names = layers, names
        self.enabled = True
        self._x = self._version = None
        self._pending: dict[int, torch.Tensor] = {}  # index of a sibling -> its output, not yet asked for

    def output(self, layer: nn.Module, x: torch.Tensor, compute) -> torch.Tensor | None:
        """This layer's output for x, or None to compute it alone. `compute(layers, x)` computes the whole
        group's outputs (a tuple, in self.layers' order) or returns None when the group can't be fused now."""
        i = self.layers.index(layer)
        if self._pending:
            if i in self._pending:
                if self._x is x and _version(x) == self._version:
                    y = self._pending.pop(i)
                    if not self._pending:
                        self._x = None
                    return y
                # a sibling called on another input: this model doesn't call them as a group
                log.info("sibling layers %s are not called on one input; computing them one by one", self.names)
                self.enabled, self._pending, self._x = False, {}, None
                return None
            # this layer had its output already: a new round, the last one cut short (a recomputation that
            # stopped early, an exception); its held outputs are dropped
            self._pending, self._x = {}, None
        ys = compute(self.layers, x)
        if ys is None:
            return None
        self._x, self._version = x, _version(x)
        self._pending = {j: y for j, y in enumerate(ys) if j != i}
        return ys[i]


def _version(x: torch.Tensor) -> int:
    """In-place writes to x since it was made (inference-mode tensors keep no counter: identity only; nor
    does a compiled graph, whose tensors are written in place only where the graph says)."""
    return 0 if torch.compiler.is_compiling() or x.is_inference() else x._version


def link_siblings(model: nn.Module, layer_type: type | None = None) -> int:
    """Give every set of sibling GPTQ-LoRA layers under one parent a shared SiblingGroup; the number of
    groups made. Layers of other types (plain PEFT LoRA on fp16 parts) are left alone."""
    if layer_type is None:
        from gptqlora.adapters.layer import GPTQLoraLinear as layer_type
    made = 0
    for parent in model.modules():
        for names in SIBLINGS:
            layers = [getattr(parent, n, None) for n in names]
            present = [(n, m) for n, m in zip(names, layers) if isinstance(m, layer_type)]
            if len(present) < 2:
                continue
            group = SiblingGroup([m for _, m in present], [n for n, _ in present])
            for _, m in present:
                m.siblings = group
            made += 1
    return made


def unlink_siblings(model: nn.Module) -> None:
    """Back to layer-by-layer calls (for comparisons)."""
    for m in model.modules():
        if getattr(m, "siblings", None) is not None:
            m.siblings = None
