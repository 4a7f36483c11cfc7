"""Build tokenized train/val datasets from local JSON / JSONL files.

Template choice per file (files of different kinds may be mixed):

- records of the same kind as ``template`` (``template.kind``) use ``template``;
- other Alpaca records use the bundled ``alpaca`` template, other CoT records the
  bundled ``cot`` template (so ``--template alpaca_short`` with a CoT file renders
  the CoT file with ``cot``, and ``--template my_cot.json`` with an Alpaca file
  renders the Alpaca file with ``alpaca``);
- chat records use the tokenizer's ``chat_template``.

Use :func:`templates_for` to see (and save) the exact templates a run used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import datasets

from gptqlora.data.collate import pack_examples
from gptqlora.data.records import DataError, RecordFile, read_records
from gptqlora.data.templates import PromptTemplate
from gptqlora.data.tokenize import encode_record

logger = logging.getLogger(__name__)


def template_for_kind(kind: str, template: PromptTemplate) -> PromptTemplate | None:
    """The template records of ``kind`` are rendered with (None for chat)."""
    if kind == "chat":
        return None
    return template if template.kind == kind else PromptTemplate.load(kind)


def templates_for(files: Sequence[RecordFile], template: PromptTemplate) -> dict[str, PromptTemplate]:
    """kind -> template actually used, for the kinds present in ``files``."""
    out = {}
    for f in files:
        tpl = template_for_kind(f.kind, template)
        if tpl is not None:
            out[f.kind] = tpl
    return out


def load_json_dataset(path: str | Path, cache_dir: str | None = None) -> datasets.Dataset:
    """A local JSON/JSONL file as a ``datasets.Dataset`` (validate it with ``read_records`` first)."""
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:  # datasets' own errors rarely say where; keep the file name at least
        raise DataError(f"{path}: the datasets library could not load this file: {e}") from e


def _encode_file(
    rf: RecordFile,
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int,
    train_on_inputs: bool,
    cache_dir: str | None,
) -> datasets.Dataset:
    ds = load_json_dataset(rf.path, cache_dir)
    if len(ds) != len(rf):
        raise DataError(f"{rf.path}: read {len(rf)} records but the datasets library found {len(ds)}")
    tpl = template_for_kind(rf.kind, template)

    def encode(record: dict[str, Any], idx: int) -> dict[str, list[int]]:
        return encode_record(
            tokenizer, record, rf.kind, tpl, cutoff_len, train_on_inputs, where=rf.locations[idx]
        )

    return ds.map(
        encode,
        with_indices=True,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc=f"tokenizing {rf.path.name}",
    )


def build_datasets(
    data_paths: Sequence[str | Path],
    tokenizer: Any,
    template: PromptTemplate,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    val_set_size: int | float = 0,
    seed: int = 42,
    packing: bool = False,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Validate, load, render, tokenize and split the data files.

    Returns ``(train, val)``; columns ``input_ids``, ``attention_mask``, ``labels``
    (packed train rows: ``input_ids``, ``labels``, ``position_ids``, up to
    ``cutoff_len`` tokens each; the validation set is never packed).
    ``val_set_size`` is a record count (int >= 1) or a fraction (0 < float < 1);
    0 means no validation set.
    """
    if not data_paths:
        raise DataError("no data files given")
    files = [read_records(p) for p in data_paths]  # all files validated before any tokenizing
    for f in files:
        logger.info("%s: %d %s records", f.path, len(f.records), f.kind)
    parts = [_encode_file(f, tokenizer, template, cutoff_len, train_on_inputs, cache_dir) for f in files]
    full = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    full = full.shuffle(seed=seed)

    val = None
    if val_set_size:
        n_val = val_set_size if val_set_size >= 1 else round(val_set_size * len(full))
        if not 1 <= n_val < len(full):
            raise DataError(
                f"val_set_size={val_set_size} leaves no training records ({len(full)} records in all)"
            )
        split = full.train_test_split(test_size=int(n_val), shuffle=False)
        full, val = split["train"], split["test"]
    if packing:
        full = datasets.Dataset.from_list(pack_examples(full, cutoff_len))
    logger.info(
        "built %d train rows%s from %d files", len(full), f" and {len(val)} val rows" if val else "", len(files)
    )
    return full, val
