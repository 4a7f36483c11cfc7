"""The transformers Trainer, with what a long GPTQ-LoRA run needs on top.

- a checkpoint counts only once it is complete: after the Trainer has written adapter, optimizer, scheduler,
  RNG and trainer state, rank 0 writes a `COMPLETE` marker; resume takes the last marked checkpoint, so a
  run killed while saving resumes from the one before;
- a loss that is NaN/inf stops the run at once with an error that names the step and the last good
  checkpoint, instead of training on garbage;
- the log history is appended to RUN/train_log.jsonl as it comes.

`training_arguments` maps gptqlora's TrainArguments onto transformers' TrainingArguments.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from gptqlora.paths import normalize_permissions
from gptqlora.train.arguments import TrainArguments

log = logging.getLogger(__name__)

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


def ddp_sync_only_trainable(model: torch.nn.Module) -> list[str]:
    """Tell DDP to leave every buffer (the packed base: qweight, qzeros, scales, g_idx) and every frozen
    parameter alone: each rank loads the same checkpoint, so nothing of the base is broadcast, neither when
    DDP starts nor each step, and only the LoRA gradients are all-reduced. Returns the names left out."""
    names = [n for n, _ in model.named_buffers()] + [n for n, p in model.named_parameters() if not p.requires_grad]
    model._ddp_params_and_buffers_to_ignore = names  # read by DistributedDataParallel.__init__
    return names


class GPTQLoraTrainer(Trainer):
    def __init__(self, *args, **kwargs) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            ddp_sync_only_trainable(model)
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            out = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            (out / COMPLETE).write_text(json.dumps({"step": self.state.global_step}))
            normalize_permissions(out)  # safetensors writes 0600; others (a serving user) must read it

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


def precision(targs: TrainArguments, device: torch.device) -> dict[str, bool]:
    p = targs.precision
    if p == "auto":
        p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def autocast_dtype(targs: TrainArguments, device: torch.device) -> torch.dtype | None:
    """The dtype the Trainer's autocast runs in (None: no autocast, fp32)."""
    p = precision(targs, device)
    return torch.bfloat16 if p["bf16"] else torch.float16 if p["fp16"] else None


def training_arguments(output_dir: Path, run_name: str, targs: TrainArguments, world: int, device: torch.device,
                       has_val: bool) -> TrainingArguments:
    accum = max(1, targs.batch_size // (targs.micro_batch_size * world))
    if accum * targs.micro_batch_size * world != targs.batch_size:
        log.warning("batch_size %d is not micro_batch_size %d x %d process(es) x an integer; using %d",
                    targs.batch_size, targs.micro_batch_size, world, accum * targs.micro_batch_size * world)
    if targs.optim == "paged_adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError("--optim paged_adamw_8bit needs bitsandbytes: pip install 'gptqlora[bnb]'") from None
    report = [] if targs.report_to == "none" else [targs.report_to]
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=targs.micro_batch_size,
        per_device_eval_batch_size=targs.micro_batch_size, gradient_accumulation_steps=accum,
        num_train_epochs=targs.num_epochs, max_steps=targs.max_steps, learning_rate=targs.learning_rate,
        lr_scheduler_type=targs.lr_scheduler, warmup_steps=targs.warmup_steps, weight_decay=targs.weight_decay,
        optim=targs.optim, logging_steps=targs.logging_steps, save_strategy="steps", save_steps=targs.save_steps,
        save_total_limit=targs.save_total_limit, eval_strategy="steps" if has_val else "no",
        eval_steps=targs.eval_steps, report_to=report, run_name=targs.run_name or run_name,
        seed=targs.seed, data_seed=targs.seed, remove_unused_columns=False, ddp_find_unused_parameters=False, ddp_broadcast_buffers=False,
        dataloader_num_workers=0, use_cpu=device.type == "cpu", **precision(targs, device))


def resume_path(checkpoint_dir: Path, resume: str | None) -> str | None:
    """What --resume_from_checkpoint means: 'true' = the last complete checkpoint, else a checkpoint path."""
    word = str(resume).strip().lower()
    if not resume or word in ("0", "false", "no", "n", "off"):
        return None
    if word not in ("1", "true", "yes", "y", "on"):
        if not (Path(resume) / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{resume}: not a checkpoint folder (no adapter_model.safetensors)")
        return resume
    done = complete_checkpoints(checkpoint_dir)
    if not done:
        log.warning("no complete checkpoint in %s: starting from the beginning", checkpoint_dir)
        return None
    log.info("resuming from %s", done[-1])
    return str(done[-1])
