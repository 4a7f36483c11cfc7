"""The run folder: everything `merge`, `export` and `chat` need, so they take only its path.

    RUN/
      run.json           resolved arguments, base checkpoint path, quantization config, versions
      template.json      the prompt template(s) used
      tokenizer files    a copy of the tokenizer
      adapter/           the final adapter (standard PEFT LoRA)
      base/              the quantized base, when the run quantized it (or changed its codes)
      checkpoints/       checkpoint-N/ (adapter + optimizer state), the last K
      train_log.jsonl    loss and eval records
      eval.json          task accuracy before/after (when measured)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"


class RunError(ValueError):
    """A run folder that is incomplete or does not fit what it is used with."""


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    (run_dir / RUN_FILE).write_text(json.dumps(info, indent=2, default=str))


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    p = run_dir / RUN_FILE
    if not p.is_file():
        raise RunError(f"{run_dir}: no {RUN_FILE}; not a gptqlora run folder (made by `gptqlora finetune`)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{p}: not valid JSON ({e})") from None


def base_path(run_dir: str | Path, info: dict[str, Any]) -> Path:
    """The quantized base of a run: stored relative to the run folder when it lives inside it."""
    p = Path(info["base"])
    p = p if p.is_absolute() else Path(run_dir) / p
    if not p.is_dir():
        raise RunError(f"{run_dir}: its base checkpoint {p} is missing (moved or deleted?)")
    return p


def adapter_path(run_dir: str | Path) -> Path:
    p = Path(run_dir) / ADAPTER_DIR
    if not (p / "adapter_config.json").is_file():
        raise RunError(f"{run_dir}: no trained adapter in {p} (the run did not finish; resume it with "
                       f"`gptqlora finetune --output_dir {run_dir} --resume_from_checkpoint true`)")
    return p


def load_run(run_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             adapter_name: str = "default"):
    """The run's quantized base with its trained adapter loaded (what `chat` and `generate` use)."""
    from gptqlora.adapters.model import load_adapter
    from gptqlora.quant.checkpoint import load_quantized

    info = read_run_info(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    model = load_quantized(base_path(run_dir, info), device=device, dtype=dtype)
    return load_adapter(model, adapter_path(run_dir), adapter_name=adapter_name)


def load_run_tokenizer(run_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir)
