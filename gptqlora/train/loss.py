"""Chunked causal-LM loss: the logits over the vocabulary never exist for the whole batch at once.

transformers computes `lm_head` on every token, then upcasts the logits to fp32 for the cross-entropy: at
bs1 x 2048 and a 32000-word vocabulary that is 0.25 GB of fp32 logits, the same again for their gradient
and 0.125 GB in bf16, all live at the end of the forward (at 128k words, 4x that). Here the loss is
summed over chunks of `CHUNK_TOKENS` tokens, each checkpointed: a chunk's logits are computed, reduced
to a sum and freed, and recomputed in backward. The cost is one more `lm_head` matmul per token in
backward (~0.1-0.6% of a 7B-65B step). Liger's fused linear + cross-entropy (`--liger`), where it is
applied, does the same job in one kernel and replaces this.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 1024
IGNORE = -100
MODES = ("auto", "chunked", "full")


def chunked_causal_lm_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                           num_items_in_batch: torch.Tensor | int | None = None,
                           chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """transformers' ForCausalLMLoss (tokens < n predict n; mean over labelled tokens, or sum /
    num_items_in_batch under gradient accumulation) from hidden [B, S, H] without [B*S, V] logits."""
    shift = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1)  # (B*S,)
    h = hidden.reshape(-1, hidden.shape[-1])  # (B*S, H)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        y = shift[i:i + chunk].to(h.device)
        if bool((y != IGNORE).any()):
            total = total + checkpoint(_chunk_loss, h[i:i + chunk], y, lm_head, use_reentrant=False)
    if num_items_in_batch is None:
        return total / (shift != IGNORE).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_loss(h: torch.Tensor, y: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), y, ignore_index=IGNORE, reduction="sum")


def apply_chunked_loss(model: nn.Module, chunk: int = CHUNK_TOKENS) -> None:
    """Make a *ForCausalLM instance compute its training loss in chunks (apply before PEFT wraps it).

    Only a forward with labels and gradients changes, and it returns no logits; evaluation and generation
    run the model's own forward."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, num_items_in_batch=None, **kwargs):
        if labels is None or not torch.is_grad_enabled() or logits_to_keep:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, num_items_in_batch=num_items_in_batch, **kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        loss = chunked_causal_lm_loss(out.last_hidden_state, self.lm_head, labels, num_items_in_batch, chunk)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    model.forward = types.MethodType(forward, model)
