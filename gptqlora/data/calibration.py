"""Calibration samples rendered from training records, exactly as training sees them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import torch

from gptqlora.data.dataset import template_for_kind
from gptqlora.data.records import read_records
from gptqlora.data.templates import PromptTemplate


def calibration_from_data(data_files: Sequence[str | Path], tokenizer: Any, template: PromptTemplate,
                          nsamples: int, seqlen: int, seed: int = 0) -> list[torch.Tensor]:
    """Up to `nsamples` LongTensors [1, seqlen] cut from the rendered (prompt + response) records."""
    texts = []
    for f in map(read_records, data_files):
        tpl = template_for_kind(f.kind, template)
        for r in f.records:
            texts.append(tpl.prompt(r) + tpl.response(r) if tpl is not None
                         else tokenizer.apply_chat_template(r["messages"], tokenize=False))
    if not texts:
        from gptqlora.quant.calibration import CalibrationError

        raise CalibrationError("no training records to calibrate on; pass a calibration file (--calibration)")
    random.Random(seed).shuffle(texts)
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts[: nsamples * 8]), add_special_tokens=False)["input_ids"]
    windows = range(0, len(ids) - seqlen + 1, seqlen)
    samples = [torch.tensor([ids[i:i + seqlen]], dtype=torch.long) for i in windows][:nsamples]
    return samples or [torch.tensor([ids], dtype=torch.long)]
