"""FSDP2 of a GPTQ-LoRA model: the packed base sharded over the ranks, each decoder block gathered only
while it runs. Each rank then holds 1/world of the packed weights, at the cost of all-gathering every block
in forward and again in backward (the whole packed model twice per step over the interconnect).

`gptqlora finetune` trains with DDP (every rank holds the whole packed base); this is the library path,
tested on CPU with gloo (tests/train/test_fsdp.py). Not wired into `finetune`: accelerate's FSDP plugin
applies its own mixed-precision cast to every parameter, which would destroy the float32-viewed packed
words (gptqlora/nn/shardable.py), and its checkpointing saves the full state dict.
"""

from __future__ import annotations

from torch import nn

from gptqlora.nn.shardable import make_shardable


def shard_packed_model(model: nn.Module, mesh) -> int:
    """make_shardable, then `fully_shard` each decoder block and the whole model over `mesh` (a
    DeviceMesh; every rank must hold the same full model when called). Returns the packed layers converted."""
    from torch.distributed.fsdp import fully_shard

    from gptqlora.train.checkpointing import decoder_blocks

    n = make_shardable(model)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)  # no MixedPrecisionPolicy: a param_dtype cast would rewrite the words
    fully_shard(model, mesh=mesh)
    return n
