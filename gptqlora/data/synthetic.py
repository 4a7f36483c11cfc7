"""Deterministic synthetic tasks for smoke-training and measuring quantization damage.

- Multi-step arithmetic as CoT records::

    {"question": "What is 37 + 48 - 19?", "rationale": "37 + 48 = 85. 85 - 19 = 66.",
     "answer": "66", "task": "arith"}

- String transformations from instructions as Alpaca records (the word is in
  ``input``, or quoted in the instruction when ``input`` is empty)::

    {"instruction": "Reverse the word.", "input": "kabt", "output": "tbak", "task": "reverse"}

Every generator takes a seed and uses its own ``random.Random``, so the same
arguments always give the same records. ``score`` checks a model's generated
response against a record.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path
from typing import Any, Callable, Iterable

ANSWER_RE = re.compile(r"The answer is (.+?)\.?[ \t]*$", re.MULTILINE)

# task name -> (instruction, function of the word); "{n}" is filled per record.
_STRING_TASKS: dict[str, tuple[str, Callable[..., str]]] = {
    "reverse": ("Reverse the word.", lambda w, **_: w[::-1]),
    "upper": ("Write the word in uppercase.", lambda w, **_: w.upper()),
    "capitalize": ("Capitalize the word.", lambda w, **_: w[:1].upper() + w[1:]),
    "sort": ("Sort the letters of the word.", lambda w, **_: "".join(sorted(w))),
    "length": ("How many letters are in the word?", lambda w, **_: str(len(w))),
    "first": ("Give the first letter of the word.", lambda w, **_: w[0]),
    "last": ("Give the last letter of the word.", lambda w, **_: w[-1]),
    "repeat": ("Repeat the word {n} times.", lambda w, n, **_: " ".join([w] * n)),
}
STRING_TASKS = tuple(_STRING_TASKS)
# The no-input form names the word in the instruction instead: "Reverse the word 'kabt'."
_NO_INPUT_SUBJECT = "the word"


def _word(rng: random.Random, min_len: int, max_len: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))


def string_record(
    rng: random.Random, task: str | None = None, min_len: int = 3, max_len: int = 5, p_no_input: float = 0.3
) -> dict[str, str]:
    """One Alpaca-style string-transformation record."""
    task = task or rng.choice(STRING_TASKS)
    instruction, fn = _STRING_TASKS[task]
    word = _word(rng, min_len, max_len)
    n = rng.randint(2, 3)
    instruction = instruction.format(n=n)
    output = fn(word, n=n)
    if rng.random() < p_no_input:
        instruction = instruction.replace(_NO_INPUT_SUBJECT, f"{_NO_INPUT_SUBJECT} '{word}'", 1)
        return {"instruction": instruction, "input": "", "output": output, "task": task}
    return {"instruction": instruction, "input": word, "output": output, "task": task}


def arithmetic_record(
    rng: random.Random, min_terms: int = 2, max_terms: int = 4, max_operand: int = 20
) -> dict[str, str]:
    """One CoT record: a chain of + and - on small non-negative integers, worked step by step."""
    total = rng.randint(1, max_operand)
    expr, steps = str(total), []
    for _ in range(rng.randint(min_terms, max_terms) - 1):
        if total > 0 and rng.random() < 0.5:  # subtract, keeping the result >= 0
            b = rng.randint(1, min(total, max_operand))
            new, op = total - b, "-"
        else:
            b = rng.randint(1, max_operand)
            new, op = total + b, "+"
        steps.append(f"{total} {op} {b} = {new}.")
        expr += f" {op} {b}"
        total = new
    return {
        "question": f"What is {expr}?",
        "rationale": " ".join(steps),
        "answer": str(total),
        "task": "arith",
    }


def string_records(n: int, seed: int, **kwargs: Any) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [string_record(rng, **kwargs) for _ in range(n)]


def arithmetic_records(n: int, seed: int, **kwargs: Any) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [arithmetic_record(rng, **kwargs) for _ in range(n)]


def record_key(record: dict[str, Any]) -> tuple[str, ...]:
    """What makes two records the same task instance (used to keep eval out of training)."""
    if "question" in record:
        return (record["question"],)
    return (record["instruction"], record.get("input", ""))


def split_unique(
    records: Iterable[dict[str, Any]], n_eval: int, exclude: set[tuple[str, ...]] = frozenset()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval): the first ``n_eval`` distinct records are eval; train holds none of them nor ``exclude``."""
    train, evals, seen = [], [], set(exclude)
    for rec in records:
        key = record_key(rec)
        if len(evals) < n_eval:
            if key not in seen:
                evals.append(rec)
                seen.add(key)
        elif key not in seen:
            train.append(rec)
    return train, evals


# -- scoring -------------------------------------------------------------------
def answer_of(record: dict[str, Any]) -> str:
    """The expected final answer of a record."""
    if "answer" in record:
        return str(record["answer"])
    if "output" in record:
        return record["output"]
    if "messages" in record:
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    raise KeyError("record has no answer/output/messages field")


def extract_answer(record: dict[str, Any], generated_text: str) -> str:
    """The final answer in a generated response: ``The answer is X.`` for CoT, else the stripped text."""
    if "answer" in record:
        matches = ANSWER_RE.findall(generated_text)
        return matches[-1].strip() if matches else ""
    return generated_text.strip()


def score(record: dict[str, Any], generated_text: str) -> bool:
    """True if the generated *response* (the text after the prompt) answers the record correctly."""
    return extract_answer(record, generated_text) == answer_of(record).strip()


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
