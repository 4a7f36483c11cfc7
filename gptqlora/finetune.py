"""`gptqlora finetune`: GPTQ-LoRA training, from a GPTQ checkpoint (or an fp16 model quantized first).

With no arguments it runs the built-in demo: the bundled tiny LLaMA, quantized to 2 bit, trained on the
bundled Alpaca-style and CoT synthetic data, with task accuracy measured before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gptqlora.args import add_dataclass_arguments, build_dataclasses, read_yaml_config
from gptqlora.train_args import (ALIASES, ARG_CLASSES, DataArguments, LoraArguments, ModelArguments,
                                 TrainArguments)

log = logging.getLogger(__name__)

# The built-in demo: what `gptqlora finetune` with no model arguments fills in (flags still override).
DEMO_DEFAULTS = {
    "bits": 2, "group_size": 64, "nsamples": 64, "micro_batch_size": 16, "batch_size": 16, "max_steps": 150,
    "learning_rate": 2e-3, "warmup_steps": 10, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
    "logging_steps": 10, "save_steps": 50, "eval_accuracy": True, "eval_limit": 100, "cutoff_len": 128,
}
EXAMPLES = """examples:
  gptqlora finetune                                    # the built-in demo (tiny model, 2 bit, CPU)
  gptqlora finetune --quant_checkpoint llama-7b-4bit --data alpaca.json --output_dir runs/alpaca-7b
  gptqlora finetune --base_model llama-7b --bits 2 --group_size 64 --data cot.jsonl --template cot
  gptqlora finetune --config configs/llama-7b-4bit.yaml --max_steps 100
research-script spellings are accepted too: --data_path, --cutoff_len, --use_gradient_checkpointing,
--target_modules="['q_proj','v_proj']", --adapter_name=gptqlora, --train_on_inputs=False ..."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptqlora finetune", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train GPTQ-LoRA adapters on a quantized model. Writes a run folder holding everything "
                    "`gptqlora merge`, `export` and `chat` need.")
    parser.add_argument("--config", help="YAML file of arguments (same names); command-line flags override it")
    for cls in ARG_CLASSES:
        add_dataclass_arguments(parser, cls, ALIASES)
    return parser


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, LoraArguments, TrainArguments]:
    ns = vars(build_parser().parse_args(argv))
    config = ns.pop("config", None)
    values = read_yaml_config(config) if config else {}
    values.pop("command", None)  # a config's own first-line hint is not an argument
    values.update(ns)
    if not values.get("quant_checkpoint") and not values.get("base_model"):
        values = {**DEMO_DEFAULTS, **values}
    return tuple(build_dataclasses(ARG_CLASSES, values, where=f"{config}: " if config else ""))


def _run_dir(targs: TrainArguments) -> Path:
    run_dir = Path(targs.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()) and not targs.resume_from_checkpoint:
        if not targs.overwrite:
            raise FileExistsError(f"{run_dir} already holds a run; pass --overwrite to replace it, "
                                  f"--resume_from_checkpoint true to continue it, or another --output_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def finetune(margs: ModelArguments, dargs: DataArguments, largs: LoraArguments,
             targs: TrainArguments) -> dict[str, Any]:
    """Run the whole job; returns a summary (also in RUN/run.json and RUN/eval.json)."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from gptqlora.data.assets import default_data_files, tiny_model_dir
    from gptqlora.data.dataset import build_datasets
    from gptqlora.data.records import read_records
    from gptqlora.data.templates import PromptTemplate

    if targs.dry_run:
        return _dry_run(margs, dargs, largs, targs)
    if largs.adapter_name not in ("gptqlora", "lora"):
        raise ValueError(f"--adapter_name {largs.adapter_name!r}: only 'gptqlora' (LoRA) is supported")
    state = PartialState(cpu=targs.device == "cpu")
    demo = not margs.quant_checkpoint and not margs.base_model
    if demo:
        margs.base_model = str(tiny_model_dir())
    data_files = [str(p) for p in (dargs.data or default_data_files())]
    run_dir = _run_dir(targs) if state.is_main_process else Path(targs.output_dir or "runs/unnamed")
    state.wait_for_everyone()
    _seed_everything(targs.seed)

    # Data first: bad records fail here, before any quantization or training.
    tok_src = margs.quant_checkpoint or margs.base_model
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = PromptTemplate.load(dargs.template)
    train_ds, val_ds = build_datasets(data_files, tokenizer, template, dargs.cutoff_len, dargs.train_on_inputs,
                                      dargs.val_set_size, targs.seed, dargs.packing)

    base_dir = Path(margs.quant_checkpoint) if margs.quant_checkpoint else run_dir / "base"
    if not margs.quant_checkpoint and state.is_main_process and not (base_dir / "config.json").is_file():
        _quantize_base(margs, data_files, template, tokenizer, dargs.cutoff_len, base_dir, state.device)
    state.wait_for_everyone()

    info = {"base": "base" if base_dir == run_dir / "base" else str(base_dir.resolve()),
            "base_model": str(Path(margs.base_model).resolve()) if margs.base_model else None,
            "data": data_files, "data_kinds": sorted({read_records(f).kind for f in data_files}),
            "template": template.to_dict(), "demo": demo,
            "args": {c.__name__: asdict(a) for c, a in zip(ARG_CLASSES, (margs, dargs, largs, targs))},
            "versions": _versions()}
    if state.is_main_process:
        _write_run_files(run_dir, info, tokenizer, template)

    from gptqlora.quant.checkpoint import load_quantized

    dtype = torch.float16 if state.device.type == "cuda" else torch.float32
    model = load_quantized(base_dir, device=state.device, dtype=dtype)
    info["quant_config"] = model.gptq_config.to_dict()
    if margs.bits is not None and margs.bits != model.gptq_config.bits:
        raise ValueError(f"--bits {margs.bits} but {base_dir} is a {model.gptq_config.bits}-bit checkpoint")
    evals: dict[str, Any] = {}
    if targs.eval_accuracy:
        if demo:
            evals["fp16"] = _accuracy_of_fp_model(margs.base_model, tokenizer, template, targs, state.device)
        evals["quantized"] = _accuracy(model, tokenizer, template, targs)

    peft_model = _wrap(model, margs, largs, targs)
    trainer = _trainer(peft_model, tokenizer, train_ds, val_ds, run_dir, dargs, targs, state)
    result = trainer.train(resume_from_checkpoint=_resume_path(run_dir, targs))
    if state.is_main_process:
        _save_adapter(peft_model, run_dir)
    if targs.eval_accuracy:
        evals["quantized+lora"] = _accuracy(peft_model, tokenizer, template, targs)
    summary = {"run_dir": str(run_dir), "train_loss": result.training_loss, "steps": result.global_step,
               "accuracy": {k: v["accuracy"] for k, v in evals.items()}}
    if state.is_main_process:
        info["result"] = summary
        from gptqlora.run import write_run_info

        write_run_info(run_dir, info)
        if evals:
            (run_dir / "eval.json").write_text(json.dumps(
                {k: {kk: vv for kk, vv in v.items() if kk != "responses"} for k, v in evals.items()}, indent=2))
    return summary


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from gptqlora import __version__

    return {"gptqlora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _write_run_files(run_dir: Path, info: dict, tokenizer, template) -> None:
    from gptqlora.run import write_run_info

    write_run_info(run_dir, info)
    (run_dir / "template.json").write_text(json.dumps(template.to_dict(), indent=2))
    tokenizer.save_pretrained(run_dir)


def _quantize_base(margs: ModelArguments, data_files: list[str], template, tokenizer, seqlen: int,
                   out: Path, device: torch.device) -> None:
    """GPTQ-quantize --base_model into RUN/base, calibrated on --calibration or on the training data."""
    from gptqlora.data.calibration import calibration_from_data
    from gptqlora.quant.calibration import load_calibration
    from gptqlora.quant.config import QuantConfig
    from gptqlora.quant.driver import quantize_model

    if margs.calibration:
        samples = load_calibration(margs.calibration, tokenizer, margs.nsamples, seqlen)
    else:
        samples = calibration_from_data(data_files, tokenizer, template, margs.nsamples, seqlen)
    bits, group_size = margs.bits or 4, margs.group_size or 128
    qcfg = QuantConfig(bits=bits, group_size=group_size, desc_act=margs.desc_act)
    log.info("quantizing %s to %d bit (group %d) into %s", margs.base_model, bits, group_size, out)
    quantize_model(margs.base_model, out, qcfg, samples, device=device, overwrite=True)


def _wrap(model, margs: ModelArguments, largs: LoraArguments, targs: TrainArguments):
    from gptqlora.adapters import GPTQLoraConfig, get_peft_model
    from gptqlora.liger import apply_liger

    model.config.use_cache = False
    apply_liger(model, targs.liger)
    if targs.use_gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": targs.reentrant_checkpointing})
        model.enable_input_require_grads()  # frozen embeddings: reentrant checkpoints need a grad input
    qa_group = largs.qalora_group_size or model.gptq_config.group_size
    config = GPTQLoraConfig(r=largs.lora_r, lora_alpha=largs.lora_alpha, lora_dropout=largs.lora_dropout,
                            target_modules=list(largs.target_modules), lora_dtype=largs.lora_dtype,
                            init_method=largs.init_method, svd_iters=largs.svd_iters,
                            svd_source=margs.base_model if largs.init_method == "svd" else None,
                            use_qalora=largs.use_qalora, qalora_group_size=qa_group)
    peft_model = get_peft_model(model, config)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("trainable LoRA parameters: %s", f"{n_train:,}")
    return peft_model


def _precision(targs: TrainArguments, device: torch.device) -> dict[str, bool]:
    p = targs.precision
    if p == "auto":
        p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def _trainer(peft_model, tokenizer, train_ds, val_ds, run_dir: Path, dargs: DataArguments,
             targs: TrainArguments, state):
    from gptqlora.data.collate import DataCollator
    from gptqlora.trainer import GPTQLoraTrainer, JsonlLogCallback

    args = training_arguments(run_dir, targs, state.num_processes, state.device, val_ds is not None)
    return GPTQLoraTrainer(model=peft_model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                           data_collator=DataCollator(tokenizer, pad_to_multiple_of=8),
                           callbacks=[JsonlLogCallback(run_dir / "train_log.jsonl")])


def training_arguments(run_dir: Path, targs: TrainArguments, world: int, device: torch.device,
                       has_val: bool):
    from transformers import TrainingArguments

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
        output_dir=str(run_dir / "checkpoints"), per_device_train_batch_size=targs.micro_batch_size,
        per_device_eval_batch_size=targs.micro_batch_size, gradient_accumulation_steps=accum,
        num_train_epochs=targs.num_epochs, max_steps=targs.max_steps, learning_rate=targs.learning_rate,
        lr_scheduler_type=targs.lr_scheduler, warmup_steps=targs.warmup_steps, weight_decay=targs.weight_decay,
        optim=targs.optim, logging_steps=targs.logging_steps, save_strategy="steps", save_steps=targs.save_steps,
        save_total_limit=targs.save_total_limit, eval_strategy="steps" if has_val else "no",
        eval_steps=targs.eval_steps, report_to=report, run_name=targs.run_name or run_dir.name,
        seed=targs.seed, data_seed=targs.seed, remove_unused_columns=False, ddp_find_unused_parameters=False,
        dataloader_num_workers=0, use_cpu=device.type == "cpu", **_precision(targs, device))


def _dry_run(margs, dargs, largs, targs) -> dict[str, Any]:
    """The resolved arguments and the Trainer settings they give, without loading anything."""
    from accelerate import PartialState

    state = PartialState(cpu=targs.device == "cpu")
    run_dir = Path(targs.output_dir or "runs/<time>")
    ta = training_arguments(run_dir, targs, state.num_processes, state.device, bool(dargs.val_set_size))
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs",
            "max_steps", "lr_scheduler_type", "warmup_steps", "optim", "bf16", "fp16", "save_steps",
            "save_total_limit", "eval_strategy", "report_to", "seed")
    return {"dry_run": True, "world_size": state.num_processes,
            "args": {c.__name__: asdict(a) for c, a in zip(ARG_CLASSES, (margs, dargs, largs, targs))},
            "trainer": {k: str(getattr(ta, k)) if not isinstance(getattr(ta, k), (int, float, bool, list))
                        else getattr(ta, k) for k in keys}}


def _resume_path(run_dir: Path, targs: TrainArguments) -> str | None:
    from gptqlora.args import str2bool
    from gptqlora.trainer import complete_checkpoints

    r = targs.resume_from_checkpoint
    if not r:
        return None
    try:
        if not str2bool(r):
            return None
    except argparse.ArgumentTypeError:
        if not (Path(r) / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{r}: not a checkpoint folder (no adapter_model.safetensors)") from None
        return r
    done = complete_checkpoints(run_dir / "checkpoints")
    if not done:
        log.warning("no complete checkpoint in %s: starting from the beginning", run_dir / "checkpoints")
        return None
    log.info("resuming from %s", done[-1])
    return str(done[-1])


def _save_adapter(peft_model, run_dir: Path) -> None:
    from gptqlora.quant.io import atomic_output_dir
    from gptqlora.run import ADAPTER_DIR

    with atomic_output_dir(run_dir / ADAPTER_DIR, overwrite=True) as tmp:
        peft_model.save_pretrained(tmp)
    if getattr(peft_model.get_base_model(), "base_codes_modified", False):  # SVD alternations changed codes
        from gptqlora.quant.checkpoint import save_quantized

        save_quantized(peft_model.get_base_model(), run_dir / "base", overwrite=True)


def _eval_records(limit: int) -> list[dict]:
    from gptqlora.data.assets import eval_data_files
    from gptqlora.data.records import read_records

    out = []
    for f in eval_data_files():
        out += read_records(f).records[:limit]
    return out


def _accuracy(model, tokenizer, template, targs: TrainArguments) -> dict[str, Any]:
    from gptqlora.data.dataset import template_for_kind
    from gptqlora.data.records import detect_kind
    from gptqlora.eval.accuracy import task_accuracy

    records = _eval_records(targs.eval_limit)
    return task_accuracy(model, tokenizer, records, lambda r: template_for_kind(detect_kind(r), template),
                         max_new_tokens=48, batch_size=50)


def _accuracy_of_fp_model(model_dir: str, tokenizer, template, targs: TrainArguments, device) -> dict:
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return _accuracy(fp, tokenizer, template, targs)


def main(argv: list[str] | None = None) -> int:
    margs, dargs, largs, targs = parse_args(sys.argv[1:] if argv is None else argv)
    summary = finetune(margs, dargs, largs, targs)
    if summary.get("dry_run"):
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return 0
    acc = summary["accuracy"]
    lines = [f"run folder: {summary['run_dir']}  (steps {summary['steps']}, final train loss "
             f"{summary['train_loss']:.4f})"]
    if acc:
        lines.append("task accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    lines.append(f"next: gptqlora chat {summary['run_dir']}   |   gptqlora merge {summary['run_dir']} --to fp16 "
                 f"--out merged/")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
