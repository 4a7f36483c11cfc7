"""Calibration data for quantization: a calibration file (text, or JSON/JSONL with a `text` or
`input_ids` field), or training records rendered exactly as training sees them."""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from gptqlora.data.dataset import template_for_kind
from gptqlora.data.records import read_records
from gptqlora.data.templates import PromptTemplate

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    pass


_LONG = "sequence-length-is-longer-than-the-specified-maximum"


@contextlib.contextmanager
def long_text_ok(tokenizer: Any):
    """Calibration text is tokenized whole and then cut into windows, so a text longer than the model's
    context is expected here: keep transformers from warning that it is."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if not isinstance(flags, dict):
        yield
        return
    before = flags.get(_LONG)
    flags[_LONG] = True  # transformers' "already warned" flag
    try:
        yield
    finally:
        if before is None:
            flags.pop(_LONG, None)
        else:
            flags[_LONG] = before


RECORD_FIELDS = ("instruction", "input", "output", "response")  # an Alpaca-style record's text, in this order


def read_calibration_records(path: str | Path) -> tuple[list[str], list[list[int]]]:
    """(texts, token lists) from a .txt file (the whole file is text) or JSON/JSONL records: 'text',
    'input_ids', or Alpaca-style instruction fields (joined by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix not in (".json", ".jsonl"):
        return ([raw] if raw.strip() else []), []
    if path.suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: not valid JSON ({e})") from None
        if isinstance(records, dict):
            records = [records]
        where = [f"{path}: record {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:  # worded as finetune's data reader words it (data/records.py)
                raise CalibrationError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno}); each line of a "
                                       f"JSON Lines file must hold one complete JSON object") from None
            where.append(f"{path}:{n}")
    texts, ids = [], []
    for rec, w in zip(records, where):
        if not isinstance(rec, dict):
            raise CalibrationError(f"{w}: expected an object with a 'text' or 'input_ids' field")
        if "input_ids" in rec:
            toks = rec["input_ids"]
            if not (isinstance(toks, list) and toks and all(isinstance(t, int) for t in toks)):
                raise CalibrationError(f"{w}: 'input_ids' must be a non-empty list of integers")
            ids.append(toks)
        elif isinstance(rec.get("text"), str):
            if rec["text"].strip():
                texts.append(rec["text"])
        elif any(isinstance(rec.get(k), str) for k in RECORD_FIELDS):  # finetune's instruction records: their text
            text = "\n\n".join(rec[k] for k in RECORD_FIELDS if isinstance(rec.get(k), str) and rec[k].strip())
            if text:
                texts.append(text)
        else:
            raise CalibrationError(f"{w}: no 'text' (string), 'input_ids' or instruction fields "
                                   f"({', '.join(RECORD_FIELDS)})")
    return texts, ids


def load_calibration(path: str | Path, tokenizer, nsamples: int = 128, seqlen: int = 2048,
                     seed: int = 0) -> list[torch.Tensor]:
    """Calibration samples as LongTensors [1, L].

    `input_ids` records are used as given. Text is joined (EOS between records), tokenized, and cut into
    `nsamples` windows of `seqlen` tokens at random offsets; a corpus shorter than that gives what it has.
    """
    texts, ids = read_calibration_records(path)
    samples = [torch.tensor([t], dtype=torch.long) for t in ids[:nsamples]]
    if texts and len(samples) < nsamples:
        sep = tokenizer.eos_token or "\n\n"
        with long_text_ok(tokenizer):
            tokens = tokenizer(sep.join(texts), add_special_tokens=False)["input_ids"]
        need = nsamples - len(samples)
        rng = random.Random(seed)
        if len(tokens) <= seqlen:
            windows = [0] if tokens else []
        elif len(tokens) >= seqlen * need:  # disjoint windows where the corpus allows
            starts = list(range(0, len(tokens) - seqlen + 1, seqlen))
            windows = sorted(rng.sample(starts, need))
        else:
            windows = [rng.randrange(len(tokens) - seqlen + 1) for _ in range(need)]
            log.warning("%s: %d tokens make %d windows of %d, fewer than the %d asked for: the windows overlap "
                        "(the same text ~%.0fx); give more text, or lower --nsamples / --seqlen", path, len(tokens),
                        len(tokens) // seqlen, seqlen, need, need * seqlen / len(tokens))
        samples += [torch.tensor([tokens[s:s + seqlen]], dtype=torch.long) for s in windows]
    samples = [s for s in samples if s.shape[1] > 0]
    if not samples:
        raise CalibrationError(f"{path}: no usable calibration text (empty, or only blank records)")
    return samples


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
        raise CalibrationError("no training records to calibrate on; pass a calibration file (--calibration)")
    random.Random(seed).shuffle(texts)
    sep = tokenizer.eos_token or "\n\n"
    with long_text_ok(tokenizer):
        ids = tokenizer(sep.join(texts[: nsamples * 8]), add_special_tokens=False)["input_ids"]
    windows = range(0, len(ids) - seqlen + 1, seqlen)
    samples = [torch.tensor([ids[i:i + seqlen]], dtype=torch.long) for i in windows][:nsamples]
    return samples or [torch.tensor([ids], dtype=torch.long)]
