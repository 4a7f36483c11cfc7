"""Calibration data for quantization: a calibration file (text, or JSON/JSONL records: `text`, `input_ids`,
or training records), or the training data files; training records are rendered exactly as training sees
them, so that the calibration text is what the model will be fine-tuned on."""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from gptqlora.data.dataset import template_for_kind
from gptqlora.data.records import DataError, detect_kind, read_records, unknown_kind, validate_record
from gptqlora.data.templates import DEFAULT_TEMPLATE, PromptTemplate

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


def _parse(path: Path, raw: str) -> tuple[list[Any], list[str]]:
    """A .json file's value (an array, or one object) or a .jsonl file's lines, and where each record is,
    located as finetune's data reader locates them ("file:line", "file[record i]")."""
    if path.suffix == ".json":
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: not valid JSON ({e})") from None
        records = [records] if isinstance(records, dict) else records
        if not isinstance(records, list):
            raise CalibrationError(f"{path}: a .json calibration file holds an array of records or one record")
        return records, [f"{path}[record {i}]" for i in range(len(records))]
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
    return records, where


def _render(record: dict[str, Any], template: PromptTemplate | None, tokenizer: Any, where: str) -> str:
    """A valid training record's whole text (prompt + response) as training renders it: through the template
    for its kind, or (None: chat) through the tokenizer's chat template."""
    if template is not None:
        return template.prompt(record) + template.response(record)
    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationError(f"{where}: chat records are rendered with the tokenizer's chat template, and this "
                               f"tokenizer has none")
    return tokenizer.apply_chat_template(record["messages"], tokenize=False)


def read_calibration_records(path: str | Path, template: PromptTemplate | None = None,
                             tokenizer: Any = None) -> tuple[list[str], list[list[int]]]:
    """(texts, token lists) from a .txt file (the whole file is text) or JSON/JSONL records: 'text',
    'input_ids', or training records (Alpaca, CoT, chat) rendered as `calibration_from_data` renders them:
    with `template` where it is for their kind, else the bundled template of their kind (default: the bundled
    templates); chat records with `tokenizer`'s chat template."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix not in (".json", ".jsonl"):
        return ([raw] if raw.strip() else []), []
    texts, ids = [], []
    kind = first = tpl = None  # the file's training-record kind, set by its first training record
    for rec, w in zip(*_parse(path, raw)):
        if not isinstance(rec, dict):
            raise CalibrationError(f"{w}: expected a JSON object, got {type(rec).__name__}")
        if "input_ids" in rec:  # token ids are used as given, whatever else the record holds
            toks = rec["input_ids"]
            if not (isinstance(toks, list) and toks and all(isinstance(t, int) for t in toks)):
                raise CalibrationError(f"{w}: 'input_ids' must be a non-empty list of integers")
            ids.append(toks)
            continue
        found = detect_kind(rec)  # finetune's reader's own test, so that both read a record alike
        if found is not None:
            if kind is None:  # as in finetune's reader, the first training record sets the file's kind
                kind, first = found, w
                tpl = template_for_kind(kind, template or PromptTemplate.load(DEFAULT_TEMPLATE))
            elif found != kind:  # finetune's reader refuses such a file too
                raise CalibrationError(f"{w}: looks like a {found} record but the file holds {kind} records (from "
                                       f"{first}); keep to one kind of training record in a file, as finetune does")
            try:
                validate_record(rec, kind, w)
            except DataError as e:  # the data reader's line, raised as this module's error
                raise CalibrationError(str(e)) from None
            text = _render(rec, tpl, tokenizer, w)
        elif "text" in rec:
            text = rec["text"]
            if not isinstance(text, str):
                raise CalibrationError(f"{w}: field 'text' must be a string, got {type(text).__name__}")
        else:
            raise CalibrationError(unknown_kind(rec, w) + "; a calibration file also takes records with a 'text' "
                                   "string or an 'input_ids' list")
        if text.strip():
            texts.append(text)
    return texts, ids


def load_calibration(path: str | Path, tokenizer, nsamples: int = 128, seqlen: int = 2048,
                     seed: int = 0, template: PromptTemplate | None = None) -> list[torch.Tensor]:
    """Calibration samples as LongTensors [1, L].

    `input_ids` records are used as given. Text (training records rendered with `template`, see
    `read_calibration_records`) is joined (EOS between records), tokenized, and cut into `nsamples` windows of
    `seqlen` tokens at random offsets; a corpus shorter than that gives what it has.
    """
    texts, ids = read_calibration_records(path, template, tokenizer)
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
        texts += [_render(r, tpl, tokenizer, w) for r, w in zip(f.records, f.locations)]
    if not texts:
        raise CalibrationError("no training records to calibrate on; pass a calibration file (--calibration)")
    random.Random(seed).shuffle(texts)
    sep = tokenizer.eos_token or "\n\n"
    with long_text_ok(tokenizer):
        ids = tokenizer(sep.join(texts[: nsamples * 8]), add_special_tokens=False)["input_ids"]
    windows = range(0, len(ids) - seqlen + 1, seqlen)
    samples = [torch.tensor([ids[i:i + seqlen]], dtype=torch.long) for i in windows][:nsamples]
    return samples or [torch.tensor([ids], dtype=torch.long)]
