"""A bridge to lm-evaluation-harness (`pip install 'gptqlora[lmeval]'`): its tasks (mmlu, gsm8k, ...) on an
already loaded model (quantized base, with or without adapters), through its HFLM wrapper.

    lm_eval_tasks(model, tokenizer, ["arc_easy"], limit=100)   # {"arc_easy": {"acc,none": 0.61, ...}}

The tasks' data come from the Hugging Face Hub (lm-eval downloads and caches them), so this needs a
network or a warm HF_DATASETS cache; task names are checked before anything is loaded.
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

from gptqlora.eval import EvalError

INSTALL = "pip install 'gptqlora[lmeval]' (or pip install lm-eval)"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError(f"lm-eval tasks (--tasks other than 'synthetic', e.g. mmlu, gsm8k) need "
                        f"lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return lm_eval, TaskManager


def check_tasks(tasks: Sequence[str]) -> None:
    """Fail with one line naming each task lm-eval does not know (and the closest names it does)."""
    _, TaskManager = _lm_eval()
    known = set(TaskManager().all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, known, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise EvalError(f"--tasks: lm-eval has no task {'; '.join(hints)}; `lm-eval ls tasks` lists them")


def lm_eval_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], limit: int | None = None,
                  batch_size: int = 8, num_fewshot: int | None = None) -> dict[str, dict]:
    """Run lm-eval tasks on `model`; {task: {metric: value}} (lm-eval's own metric names)."""
    lm_eval, _ = _lm_eval()
    check_tasks(tasks)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False)
    return {t: {k: v for k, v in r.items() if isinstance(v, (int, float, str))}
            for t, r in (out or {}).get("results", {}).items()}
