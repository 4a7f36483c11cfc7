"""The transformers Trainer, with what a long GPTQ-LoRA run needs on top.

- a checkpoint counts only once it is complete: after the Trainer has written adapter, optimizer, scheduler,
  RNG and trainer state, rank 0 writes a `COMPLETE` marker; resume takes the last marked checkpoint, so a
  run killed while saving resumes from the one before;
- a loss that is NaN/inf stops the run at once with an error that names the step and the last good
  checkpoint, instead of training on garbage;
- the log history is appended to RUN/train_log.jsonl as it comes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

COMPLETE = "COMPLETE"


class NonFiniteLossError(RuntimeError):
    pass


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """checkpoint-N folders that were written completely, oldest first."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class GPTQLoraTrainer(Trainer):
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            out = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            (out / COMPLETE).write_text(json.dumps({"step": self.state.global_step}))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            last = complete_checkpoints(self.args.output_dir)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; {where}. Lower "
                f"--learning_rate, check the data for empty or corrupt examples, or use --precision fp32/bf16")
        return loss


class JsonlLogCallback(TrainerCallback):
    """Append each log record (loss, lr, eval loss, ...) to a JSONL file, on the main process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            rec = {"step": state.global_step, "epoch": state.epoch,
                   **{k: v for k, v in logs.items() if not (isinstance(v, float) and math.isnan(v))}}
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
