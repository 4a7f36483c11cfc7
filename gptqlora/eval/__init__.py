"""Model quality: task accuracy by generation (accuracy.py), perplexity (perplexity.py), the
lm-evaluation-harness bridge (harness.py)."""


class EvalError(ValueError):
    """Bad evaluation input (a text too short, a task that does not exist, a missing optional package)."""
