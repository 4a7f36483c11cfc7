"""Batch collation (right padding) and sequence packing.

Packed rows carry ``position_ids`` that restart at 0 for every example and no
``attention_mask``. With ``attention_mask=None``, no KV cache and such
``position_ids``, transformers (5.x ``masking_utils``) detects the packed format
and builds a block-diagonal causal mask, so packed examples neither attend to
each other nor share positions: a packed row computes exactly what its examples
would alone.

Call the model with ``use_cache=False`` (or set ``model.config.use_cache = False``
for training, as fine-tuning scripts usually do): with a cache, transformers skips
the packed-sequence detection and examples in a row would see the earlier ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from gptqlora.data.tokenize import IGNORE_INDEX


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad_token nor an eos_token to pad with")
    return pad


@dataclass
class DataCollator:
    """Pads a list of encoded examples into a batch of tensors (right padding).

    ``input_ids`` pad with the pad id, ``attention_mask`` with 0, ``labels`` with -100.
    Packed examples (with ``position_ids``) pad ``position_ids`` as a fresh
    sequence and get no ``attention_mask`` (see the module docstring).
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = pad_token_id(self.tokenizer)
        packed = "position_ids" in features[0]

        def padded(key: str, value: int) -> torch.Tensor:
            rows = [list(f[key]) + [value] * (length - len(f[key])) for f in features]
            return torch.tensor(rows, dtype=torch.long)

        batch = {"input_ids": padded("input_ids", pad), "labels": padded("labels", IGNORE_INDEX)}
        if packed:
            rows = [list(f["position_ids"]) + list(range(length - len(f["position_ids"]))) for f in features]
            batch["position_ids"] = torch.tensor(rows, dtype=torch.long)
        else:
            if "attention_mask" in features[0]:
                batch["attention_mask"] = padded("attention_mask", 0)
            else:  # no mask given: every token is real
                batch["attention_mask"] = (padded("input_ids", -1) != -1).long()
        return batch


def pack_examples(examples: Iterable[dict[str, Sequence[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate encoded examples, in order, into rows of at most ``max_len`` tokens.

    Each row has ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0
    per example). The first label of every example is set to -100, since no
    token of that example precedes it (unpacked, it is never a target either).
    An example longer than ``max_len`` is cut to ``max_len``.
    """
    rows: list[dict[str, list[int]]] = []
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        ids, labels = list(ex["input_ids"])[:max_len], list(ex["labels"])[:max_len]
        if not ids:
            continue
        if len(row["input_ids"]) + len(ids) > max_len:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + labels[1:]
        row["position_ids"] += list(range(len(ids)))
    if row["input_ids"]:
        rows.append(row)
    return rows
