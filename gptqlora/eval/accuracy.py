"""Task accuracy by greedy generation (batched, left-padded) and scoring."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from gptqlora.data.synthetic import score as synthetic_score
from gptqlora.data.templates import PromptTemplate
from gptqlora.data.tokenize import encode_prompt

logger = logging.getLogger(__name__)

Record = dict[str, Any]


def _prompt_ids(tokenizer: Any, record: Record, template: PromptTemplate | None) -> list[int]:
    if "messages" in record:  # chat: everything before the last assistant turn
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        text = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if template is None:
        raise ValueError("no template for a non-chat record")
    return encode_prompt(tokenizer, template.prompt(record))


@torch.inference_mode()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int = 96,
    batch_size: int = 32,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Completions (decoded new tokens only) of tokenized prompts, in input order, in left-padded batches.

    Greedy unless ``generate_kwargs`` say otherwise (they go to ``model.generate``).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad,
          "eos_token_id": tokenizer.eos_token_id, **generate_kwargs}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths per batch
    out: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating")
    for idx in batches:
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), kw["pad_token_id"], dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: prompts end where generation starts
            n = len(prompts[i])
            ids[row, width - n :] = torch.tensor(prompts[i])
            mask[row, width - n :] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    return out


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
    prompts = [_prompt_ids(tokenizer, r, pick(r) if "messages" not in r else None) for r in records]
    was_training = model.training
    model.eval()
    try:
        responses = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
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
