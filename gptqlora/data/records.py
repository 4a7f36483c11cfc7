"""Loading and validating training records from local JSON / JSONL files.

Three record kinds, detected per file from the first record's fields:

- ``alpaca``: ``instruction`` (str), ``output`` (str), optional ``input`` (str).
- ``cot``: ``question``, ``rationale``, ``answer`` (str each), optional ``input``.
- ``chat``: ``messages``: a list of ``{"role": str, "content": str}``; at least one
  message has role ``assistant``.

Extra fields (e.g. ``task``) are allowed and kept. A file is either a JSON array
of objects or JSON Lines (one object per line; blank lines are skipped).

Every problem raises :class:`DataError` naming the file and the line (JSONL,
1-based) or the record index (JSON array, 0-based), so bad data fails before any
training starts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REQUIRED = {
    "alpaca": ("instruction", "output"),
    "cot": ("question", "rationale", "answer"),
    "chat": ("messages",),
}
OPTIONAL_STR = ("input",)
CHAT_ROLES = ("system", "user", "assistant", "tool")

_HINT = {
    "alpaca": 'Alpaca records need "instruction" and "output" strings (and an optional "input" string)',
    "cot": 'CoT records need "question", "rationale" and "answer" strings',
    "chat": 'chat records need "messages": a list of {"role": ..., "content": ...} objects',
}


class DataError(ValueError):
    """Bad training data; the message says where (file:line) and what to fix."""


@dataclass
class RecordFile:
    """A validated data file: its kind, records and where each record came from."""

    path: Path
    kind: str  # "alpaca" | "cot" | "chat"
    records: list[dict[str, Any]]
    locations: list[str]  # "file:line" (JSONL) or "file[record i]" (JSON array), one per record

    def __len__(self) -> int:
        return len(self.records)


def detect_kind(record: dict[str, Any]) -> str | None:
    """The record kind its fields suggest, or None."""
    if "messages" in record:
        return "chat"
    if "question" in record or "rationale" in record:
        return "cot"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def unknown_kind(rec: Any, where: str) -> str:
    """The one line saying that ``rec`` (at ``where``) is no record of a known kind, and what each kind needs."""
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    return f"{where}: cannot tell the record kind from fields {keys}; " + "; ".join(_HINT.values())


def _read_raw(path: Path) -> tuple[list[Any], list[str]]:
    """Parse a JSON array or JSONL file into (objects, locations)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; give the data files inside it (comma-separated)") from None
    except PermissionError:
        raise DataError(f"{path}: not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; add records or remove it from the data paths")

    if text.lstrip().startswith("["):  # JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                "the file must be one JSON array of objects, or JSON Lines"
            ) from None
        if not items:
            raise DataError(f"{path}: the JSON array is empty; add records or remove the file")
        return items, [f"{path}[record {i}]" for i in range(len(items))]

    items, locations = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                "each line of a JSON Lines file must hold one complete JSON object"
            ) from None
        locations.append(f"{path}:{lineno}")
    return items, locations


def _check_str(rec: dict[str, Any], key: str, where: str, kind: str, required: bool) -> None:
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}; {_HINT[kind]}")
        return
    if not isinstance(rec[key], str):
        raise DataError(
            f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__} "
            f"({rec[key]!r:.40}); quote the value"
        )


def validate_record(rec: Any, kind: str, where: str) -> None:
    """Raise DataError unless ``rec`` is a valid record of ``kind``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if kind == "chat":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list; {_HINT[kind]}")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str
            ):
                raise DataError(
                    f"{where}: messages[{j}] must be an object with string 'role' and 'content'"
                )
            if m["role"] not in CHAT_ROLES:
                raise DataError(f"{where}: messages[{j}] has unknown role {m['role']!r}; use one of {CHAT_ROLES}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no 'assistant' message, so nothing would be trained on")
        return
    for key in REQUIRED[kind]:
        _check_str(rec, key, where, kind, required=True)
    for key in OPTIONAL_STR:
        _check_str(rec, key, where, kind, required=False)


def read_records(path: str | Path) -> RecordFile:
    """Read and validate one data file; the kind is detected from its first record."""
    path = Path(path)
    items, locations = _read_raw(path)
    first = items[0]
    kind = detect_kind(first) if isinstance(first, dict) else None
    if kind is None:
        raise DataError(unknown_kind(first, locations[0]))
    for rec, where in zip(items, locations):
        other = detect_kind(rec) if isinstance(rec, dict) else None
        if other is not None and other != kind:
            raise DataError(
                f"{where}: looks like a {other} record but the file holds {kind} records "
                f"(from its first record); put different kinds in separate files"
            )
        validate_record(rec, kind, where)
    logger.debug("%s: %d %s records", path, len(items), kind)
    return RecordFile(path=path, kind=kind, records=items, locations=locations)
