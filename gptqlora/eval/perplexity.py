"""Perplexity with the GPTQ protocol: the whole text tokenized once, cut into non-overlapping windows of
`seqlen` tokens (the tail shorter than a window is dropped), each window scored on its own; the
perplexity is exp of the mean token loss over the windows.

    ids = text_ids(tokenizer, Path("test.txt").read_text())      # (T,)
    perplexity(model, ids, seqlen=2048)    # {"perplexity": 5.68, "tokens": 337920, "seqlen": 2048, ...}
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from gptqlora.eval import EvalError


class PerplexityError(EvalError):
    """Text or settings that give no perplexity (too short, seqlen beyond the model's context)."""


def text_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """The text as one token sequence (T,), with the tokenizer's own special tokens (BOS once, as GPTQ)."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def max_context(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_windows(n_tokens: int, seqlen: int, model_context: int | None, where: str = "text") -> int:
    """The number of windows, or a PerplexityError that says what to change."""
    if seqlen < 2:
        raise PerplexityError(f"--seqlen {seqlen}: a window needs at least 2 tokens")
    if model_context is not None and seqlen > model_context:
        raise PerplexityError(f"--seqlen {seqlen} is longer than the model's context ({model_context} tokens, "
                              f"max_position_embeddings); pass --seqlen {model_context} or less")
    if n_tokens < seqlen:
        raise PerplexityError(f"{where}: {n_tokens} tokens, fewer than one window of --seqlen {seqlen}; "
                              f"use a longer text or a smaller --seqlen")
    return n_tokens // seqlen


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 1, progress: bool = False,
               max_windows: int | None = None, where: str = "text") -> dict[str, Any]:
    """Perplexity of `model` on ids (T,): {"perplexity", "nll" (mean token loss), "tokens" (scored windows x
    seqlen), "windows", "seqlen"}."""
    n = check_windows(int(ids.numel()), seqlen, max_context(model), where)
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[:n * seqlen].reshape(n, seqlen)  # (n, seqlen)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        starts = range(0, n, batch_size)
        for s in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
            x = windows[s:s + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()  # (b, seqlen, V)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     x[:, 1:].reshape(-1), reduction="none")
            total += float(loss.view(x.shape[0], -1).mean(1).sum())  # sum of per-window mean losses
    finally:
        model.train(was_training)
    nll = total / n
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": n * seqlen, "windows": n, "seqlen": seqlen}


@torch.no_grad()
def response_perplexity(model: Any, examples: list[dict], batch_size: int = 16, progress: bool = False) -> dict:
    """Perplexity on the labelled tokens of encoded records (`input_ids`, `labels` with -100 on the prompt),
    what fine-tuning learns: {"perplexity", "nll" (mean over labelled tokens), "tokens", "records"}."""
    device = next(p.device for p in model.parameters())
    pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in tqdm(range(0, len(examples), batch_size), desc="perplexity", unit="batch", disable=not progress):
            chunk = examples[s:s + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, e in enumerate(chunk):  # right padding
                n = len(e["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            target = labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise PerplexityError("no labelled (response) tokens to score")
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "records": len(examples)}
