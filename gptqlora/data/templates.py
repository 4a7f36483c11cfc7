"""Prompt templates (alpaca-lora style JSON files).

A template is a JSON object with:

- ``description``: free text.
- ``kind``: ``"alpaca"`` (records with ``instruction``/``input``/``output``) or
  ``"cot"`` (records with ``question``/``rationale``/``answer``). Optional,
  default ``"alpaca"``.
- ``prompt_input`` / ``prompt_no_input``: ``str.format`` strings over the record's
  fields; ``prompt_input`` is used when the record has a non-empty ``input``.
  The prompt is everything the model is given, up to where the response starts.
- ``response``: format string for the training target. Optional, default
  ``"{output}"``. The bundled ``cot`` template uses
  ``"{rationale}\\nThe answer is {answer}."``.
- ``response_split``: marker after which generated text is the response.
- ``answer_pattern``: optional regex (one group) that pulls the final answer out
  of a response, e.g. ``"The answer is (.+?)\\.?\\s*$"`` for ``cot``.

Bundled templates live in ``gptqlora/data/templates/*.json``; ``PromptTemplate.load``
takes one of their names or a path to a JSON file.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

KINDS = ("alpaca", "cot")
DEFAULT_TEMPLATE = "alpaca"  # finetune --template's default, and every reader's without one


class TemplateError(ValueError):
    """A prompt template that is unknown, missing or malformed."""


def available_templates() -> list[str]:
    """Names of the bundled templates."""
    root = resources.files("gptqlora.data") / "templates"
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def _fields(fmt: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(fmt) if name}


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str
    response_format: str = "{output}"
    kind: str = "alpaca"
    description: str = ""
    answer_pattern: str | None = None

    # -- construction --------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path) -> "PromptTemplate":
        """Load a bundled template by name (``"alpaca"``) or a JSON file by path."""
        text = str(name_or_path)
        path = Path(text)
        if path.suffix == ".json" or path.exists():
            if not path.is_file():
                raise TemplateError(f"--template {path}: no such template file")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TemplateError(f"{path}: not a JSON template file ({e})") from None
            if not isinstance(data, dict):
                raise TemplateError(f"{path}: a template file holds one JSON object")
            return cls.from_dict(data, name=path.stem)
        res = resources.files("gptqlora.data") / "templates" / f"{text}.json"
        if not res.is_file():
            names = ", ".join(available_templates())
            raise TemplateError(
                f"--template {text}: unknown prompt template; use one of [{names}] "
                "or a path to a JSON template file"
            )
        return cls.from_dict(json.loads(res.read_text(encoding="utf-8")), name=text)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "custom") -> "PromptTemplate":
        missing = [k for k in ("prompt_input", "prompt_no_input", "response_split") if k not in data]
        if missing:
            raise TemplateError(f"template {name!r} lacks required keys {missing}")
        kind = data.get("kind", "alpaca")
        if kind not in KINDS:
            raise TemplateError(f"template {name!r}: kind must be one of {KINDS}, got {kind!r}")
        return cls(
            name=data.get("name", name),
            prompt_input=data["prompt_input"],
            prompt_no_input=data["prompt_no_input"],
            response_split=data["response_split"],
            response_format=data.get("response", "{output}"),
            kind=kind,
            description=data.get("description", ""),
            answer_pattern=data.get("answer_pattern"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the file format (``load`` of it gives the same template)."""
        d = asdict(self)
        d["response"] = d.pop("response_format")
        if d["answer_pattern"] is None:
            del d["answer_pattern"]
        return d

    # -- rendering -----------------------------------------------------------
    def required_fields(self) -> set[str]:
        """Record fields the template needs (``input`` is always optional)."""
        return (_fields(self.prompt_no_input) | _fields(self.response_format)) - {"input"}

    def prompt(self, record: Mapping[str, Any]) -> str:
        """Everything up to where the response starts."""
        fmt = self.prompt_input if record.get("input") else self.prompt_no_input
        return fmt.format_map(_Record(record))

    def response(self, record: Mapping[str, Any]) -> str:
        """The training target (without EOS)."""
        return self.response_format.format_map(_Record(record))

    def split_response(self, generated_text: str) -> str:
        """The response part of a generated text (prompt included or not)."""
        parts = generated_text.split(self.response_split, 1)
        text = parts[1] if len(parts) == 2 else parts[0]
        return text.strip()

    def extract_answer(self, response_text: str) -> str:
        """The final answer from a response: ``answer_pattern``'s last match, else the stripped text."""
        if self.answer_pattern:
            matches = re.findall(self.answer_pattern, response_text, flags=re.MULTILINE)
            if matches:
                return matches[-1].strip()
        return response_text.strip()


class _Record(dict):
    """format_map helper: a KeyError names the missing field clearly."""

    def __missing__(self, key: str) -> str:
        raise KeyError(f"record has no field {key!r} needed by the prompt template")
