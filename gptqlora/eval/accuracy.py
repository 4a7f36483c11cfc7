"""Task accuracy: greedy generation (the batched generator of `gptqlora.inference`) and scoring."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Sequence

from gptqlora.data.synthetic import score as synthetic_score
from gptqlora.data.templates import PromptTemplate
from gptqlora.inference import Sampling, generate_responses, record_prompt_ids

logger = logging.getLogger(__name__)

Record = dict[str, Any]


def task_accuracy(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    template_for_record: PromptTemplate | Callable[[Record], PromptTemplate | None],
    max_new_tokens: int = 96,
    batch_size: int = 32,
    scorer: Callable[[Record, str], bool] = synthetic_score,
    progress: bool = False,
) -> dict[str, Any]:
    """Greedy-generate a response per record and score it.

    ``template_for_record`` is a template, or a function record -> template
    (chat records need none). ``scorer(record, response_text)`` defaults to
    :func:`gptqlora.data.synthetic.score`. Returns ``accuracy``, ``correct``,
    ``total``, ``per_task`` (by the records' ``task`` field, if any) and
    ``responses`` (generated texts, in record order).
    """
    if not records:
        raise ValueError("no records to evaluate")
    pick = template_for_record if callable(template_for_record) else (lambda _r: template_for_record)
    prompts = [record_prompt_ids(tokenizer, r, pick(r) if "messages" not in r else None) for r in records]
    was_training = model.training
    model.eval()
    try:
        responses = generate_responses(model, tokenizer, prompts, Sampling(max_new_tokens), batch_size, progress)
    finally:
        model.train(was_training)

    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    correct = 0
    for rec, text in zip(records, responses):
        ok = bool(scorer(rec, text))
        correct += ok
        counts = per_task[str(rec.get("task", "all"))]
        counts[0] += ok
        counts[1] += 1
    result = {
        "accuracy": correct / len(records),
        "correct": correct,
        "total": len(records),
        "per_task": {t: {"accuracy": c / n, "correct": c, "total": n} for t, (c, n) in sorted(per_task.items())},
        "responses": responses,
    }
    logger.info("accuracy %.3f (%d/%d)", result["accuracy"], correct, len(records))
    return result
