"""What the first decoder block of a model receives: run the embeddings on samples and stop there.

Layer-by-layer work (GPTQ's driver, `analyze`, the activation-aware LoRA init) starts from the inputs of
block 0 and then feeds each block's outputs to the next one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import nn


class _Catcher(nn.Module):
    """Stands in for block 0: records its inputs and stops the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, dict]] = []

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append((hidden_states, kwargs))
        raise _Caught


class _Caught(Exception):
    pass


def capture_block_inputs(model: nn.Module, layers: nn.ModuleList,
                         samples: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, kwargs) that block 0 (`layers[0]`) receives for each sample of token ids."""
    device = next(p.device for p in model.get_input_embeddings().parameters())
    first, catcher = layers[0], _Catcher()
    layers[0] = catcher
    try:
        for ids in samples:
            try:
                with torch.no_grad():
                    model(input_ids=ids.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        layers[0] = first
    return catcher.inputs


def first_output(out):
    """A block's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def on_inputs(modules: Mapping[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """While inside: every forward of modules[name] calls fn(name, its first input). The hooks are removed
    on the way out, also after an exception."""
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: fn(n, inp[0])) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
