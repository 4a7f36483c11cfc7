"""`gptqlora finetune`: GPTQ-LoRA training, from a GPTQ checkpoint (or an fp16 model quantized first).

With no arguments it runs the built-in demo: the bundled tiny LLaMA, quantized to 2 bit, trained on the
bundled Alpaca-style and CoT synthetic data, with task accuracy measured before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptqlora.commands.args import add_dataclass_arguments, build_dataclasses, read_yaml_config

log = logging.getLogger(__name__)

# The built-in demo: what `gptqlora finetune` with no model arguments fills in (flags still override).
DEMO_DEFAULTS = {
    "bits": 2, "group_size": 64, "nsamples": 64, "micro_batch_size": 16, "batch_size": 16, "max_steps": 150,
    "learning_rate": 2e-3, "warmup_steps": 10, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
    "logging_steps": 10, "save_steps": 50, "eval_accuracy": True, "eval_limit": 100, "cutoff_len": 128,
}
DESCRIPTION = ("Train GPTQ-LoRA adapters on a quantized model. Writes a run folder holding everything "
               "`gptqlora merge`, `export`, `chat` and `generate` need.")
EPILOG = """examples:
  gptqlora finetune                                    # the built-in demo (tiny model, 2 bit group 64, CPU)
  gptqlora finetune --quant_checkpoint llama-7b-4bit --data alpaca.json --output_dir runs/alpaca-7b
  gptqlora finetune --base_model llama-7b --bits 2 --group_size 64 --data cot.jsonl --template cot
  gptqlora finetune --config configs/llama-7b-4bit.yaml --max_steps 100
research-script spellings are accepted too: --data_path, --cutoff_len, --use_gradient_checkpointing,
--target_modules="['q_proj','v_proj']", --adapter_name=gptqlora, --train_on_inputs=False ..."""


def arg_classes() -> list[type]:
    from gptqlora.checkpoint.config import QuantConfig
    from gptqlora.quant.api import QuantizeOptions
    from gptqlora.train.arguments import DataArguments, LoraArguments, ModelArguments, TrainArguments

    return [ModelArguments, QuantConfig, QuantizeOptions, DataArguments, LoraArguments, TrainArguments]


@dataclass
class FinetuneArgs:
    model: Any  # ModelArguments
    quant: Any  # QuantConfig: how --base_model is quantized (bits: also a check of --quant_checkpoint)
    quantize: Any  # QuantizeOptions
    data: Any  # DataArguments
    lora: Any  # LoraArguments
    train: Any  # TrainArguments
    given: frozenset[str] = field(default_factory=frozenset)  # names set by the config file or flags

    def groups(self) -> dict[str, dict]:
        parts = (self.model, self.quant, self.quantize, self.data, self.lora, self.train)
        return {type(a).__name__: asdict(a) for a in parts}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gptqlora.train.arguments import ALIASES

    parser.add_argument("--config", help="YAML file of arguments (same names); command-line flags override it")
    titles = {"QuantConfig": "quantization (of --base_model, into RUN/base; with --quant_checkpoint, a given "
                             "--bits is checked against it)",
              "QuantizeOptions": "calibration (of --base_model)"}
    for cls in arg_classes():
        add_dataclass_arguments(parser, cls, ALIASES, title=titles.get(cls.__name__))


def parse_args(argv: list[str]) -> FinetuneArgs:
    parser = argparse.ArgumentParser(prog="gptqlora finetune", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return args_from(vars(parser.parse_args(argv)))


def args_from(ns: dict[str, Any]) -> FinetuneArgs:
    """FinetuneArgs from parsed flags (only those given) on top of the --config file, or the demo's defaults."""
    ns = dict(ns)
    config = ns.pop("config", None)
    values = read_yaml_config(config) if config else {}
    values.pop("command", None)  # a config's own first-line hint is not an argument
    values.update(ns)
    given = frozenset(values)
    if not values.get("quant_checkpoint") and not values.get("base_model"):
        values = {**DEMO_DEFAULTS, **values}
    parts = build_dataclasses(arg_classes(), values, where=f"{config}: " if config else "")
    return FinetuneArgs(*parts, given=given)


def run(args: argparse.Namespace) -> int:
    ns = {k: v for k, v in vars(args).items() if k not in ("command", "func", "verbose")}
    return report(finetune(args_from(ns)))


def main(argv: list[str] | None = None) -> int:
    return report(finetune(parse_args(sys.argv[1:] if argv is None else argv)))


def report(summary: dict[str, Any]) -> int:
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


def finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run the whole job; returns a summary (also in RUN/run.json and RUN/eval.json)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from transformers import AutoTokenizer

    from gptqlora.checkpoint.checkpoint import load_quantized
    from gptqlora.data.assets import default_data_files, tiny_model_dir
    from gptqlora.data.dataset import build_datasets
    from gptqlora.data.records import read_records
    from gptqlora.data.templates import PromptTemplate
    from gptqlora.devices import configure_cuda_allocator, default_dtype
    from gptqlora.run import Run, default_run_dir
    from gptqlora.train.trainer import resume_path

    margs, dargs, largs, targs = args.model, args.data, args.lora, args.train
    if targs.dry_run:
        return _dry_run(args)
    if largs.adapter_name not in ("gptqlora", "lora"):
        raise ValueError(f"--adapter_name {largs.adapter_name!r}: only 'gptqlora' (LoRA) is supported")
    configure_cuda_allocator(targs.expandable_segments and targs.device != "cpu")  # before any CUDA memory
    state = PartialState(cpu=targs.device == "cpu")
    demo = not margs.quant_checkpoint and not margs.base_model
    if demo:
        margs.base_model = str(tiny_model_dir())
    data_files = [str(p) for p in (dargs.data or default_data_files())]
    # the same folder on every rank: the main process names it
    root = Path(targs.output_dir) if targs.output_dir else broadcast_object_list([default_run_dir()])[0]
    run = Run.create(root, targs.overwrite, bool(targs.resume_from_checkpoint)) if state.is_main_process \
        else Run(root)
    state.wait_for_everyone()
    random.seed(targs.seed)
    torch.manual_seed(targs.seed)

    # Data first: bad records fail here, before any quantization or training.
    tokenizer = AutoTokenizer.from_pretrained(margs.quant_checkpoint or margs.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = PromptTemplate.load(dargs.template)
    train_ds, val_ds = build_datasets(data_files, tokenizer, template, dargs.cutoff_len, dargs.train_on_inputs,
                                      dargs.val_set_size, targs.seed, dargs.packing)

    base_dir = Path(margs.quant_checkpoint) if margs.quant_checkpoint else run.own_base_dir
    if not margs.quant_checkpoint and state.is_main_process and not (base_dir / "config.json").is_file():
        _quantize_base(args, data_files, template, tokenizer, base_dir, state.device)
    state.wait_for_everyone()

    if state.is_main_process:
        run.record(base_dir, data_files, {read_records(f).kind for f in data_files}, template, demo=demo,
                   base_model=str(Path(margs.base_model).resolve()) if margs.base_model else None,
                   args=args.groups(), versions=_versions())
        run.save_tokenizer(tokenizer)

    model = load_quantized(base_dir, device=state.device, dtype=default_dtype(state.device))
    if "bits" in args.given and margs.quant_checkpoint and args.quant.bits != model.gptq_config.bits:
        raise ValueError(f"--bits {args.quant.bits} but {base_dir} is a {model.gptq_config.bits}-bit checkpoint")
    evals: dict[str, Any] = {}
    if targs.eval_accuracy:
        if demo:
            evals["fp16"] = _accuracy_of_fp_model(margs.base_model, tokenizer, template, targs, state.device)
        evals["quantized"] = _accuracy(model, tokenizer, template, targs)

    peft_model = _wrap(model, args)
    trainer = _trainer(peft_model, tokenizer, train_ds, val_ds, run, targs, state)
    result = trainer.train(resume_from_checkpoint=resume_path(run.checkpoints_dir, targs.resume_from_checkpoint))
    if state.is_main_process:
        run.save_adapter(peft_model)
    if targs.eval_accuracy:
        evals["quantized+lora"] = _accuracy(peft_model, tokenizer, template, targs)
    plan = peft_model.checkpointing_plan
    summary = {"run_dir": str(run.root), "train_loss": result.training_loss, "steps": result.global_step,
               "accuracy": {k: v["accuracy"] for k, v in evals.items()},
               "checkpointing": {"mode": plan.mode, "blocks_recomputed": len(plan.checkpointed), "why": plan.reason}}
    if state.is_main_process:
        run.update(quant_config=model.gptq_config.to_dict(), result=summary)
        if evals:
            run.write_eval(evals)
    return summary


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from gptqlora import __version__

    return {"gptqlora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _quantize_base(args: FinetuneArgs, data_files: list[str], template, tokenizer, out: Path,
                   device: torch.device) -> None:
    """Quantize --base_model into RUN/base (the one quantization path), calibrated on --calibration or on
    the training data."""
    from gptqlora.quant.api import TrainingData, quantize

    q = args.quant
    log.info("quantizing %s to %d bit (group %d) into %s", args.model.base_model, q.bits, q.group_size, out)
    quantize(args.model.base_model, out, q, args.quantize, tokenizer=tokenizer, device=device, overwrite=True,
             training=TrainingData(data_files, template, args.data.cutoff_len))


def _wrap(model, args: FinetuneArgs):
    from gptqlora.adapters import GPTQLoraConfig, get_peft_model
    from gptqlora.train import checkpointing
    from gptqlora.train.liger import apply_liger
    from gptqlora.train.loss import apply_chunked_loss
    from gptqlora.train.trainer import autocast_dtype

    largs, targs, dargs = args.lora, args.train, args.data
    model.config.use_cache = False
    fused_loss = apply_liger(model, targs.liger)  # Liger's fused linear + cross-entropy comes with it
    if targs.loss == "chunked" or (targs.loss == "auto" and not fused_loss):
        apply_chunked_loss(model)
    qa_group = largs.qalora_group_size or model.gptq_config.group_size
    config = GPTQLoraConfig(r=largs.lora_r, lora_alpha=largs.lora_alpha, lora_dropout=largs.lora_dropout,
                            target_modules=list(largs.target_modules), lora_dtype=largs.lora_dtype,
                            init_method=largs.init_method, svd_iters=largs.svd_iters,
                            svd_source=args.model.base_model if largs.init_method == "svd" else None,
                            use_qalora=largs.use_qalora, qalora_group_size=qa_group)
    peft_model = get_peft_model(model, config)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("trainable LoRA parameters: %s", f"{n_train:,}")
    device = next(model.parameters()).device
    mode = checkpointing.resolve_mode(targs.use_gradient_checkpointing, targs.gradient_checkpointing)
    peft_model.checkpointing_plan = checkpointing.setup(  # recorded in run.json's result
        peft_model, mode, fraction=targs.checkpoint_fraction, batch=targs.micro_batch_size, seq=dargs.cutoff_len,
        dtype=autocast_dtype(targs, device), optim=targs.optim, reentrant=targs.reentrant_checkpointing,
        offload=targs.offload_activations)
    return peft_model


def _trainer(peft_model, tokenizer, train_ds, val_ds, run, targs, state):
    from gptqlora.data.collate import DataCollator
    from gptqlora.train.trainer import GPTQLoraTrainer, JsonlLogCallback, training_arguments

    ta = training_arguments(run.checkpoints_dir, run.root.name, targs, state.num_processes, state.device,
                            val_ds is not None)
    return GPTQLoraTrainer(model=peft_model, args=ta, train_dataset=train_ds, eval_dataset=val_ds,
                           data_collator=DataCollator(tokenizer, pad_to_multiple_of=8),
                           callbacks=[JsonlLogCallback(run.train_log)])


def _dry_run(args: FinetuneArgs) -> dict[str, Any]:
    """The resolved arguments and the Trainer settings they give, without loading anything."""
    from accelerate import PartialState

    from gptqlora.run import Run
    from gptqlora.train.trainer import training_arguments

    targs = args.train
    state = PartialState(cpu=targs.device == "cpu")
    run = Run(targs.output_dir or "runs/<time>")
    ta = training_arguments(run.checkpoints_dir, run.root.name, targs, state.num_processes, state.device,
                            bool(args.data.val_set_size))
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs",
            "max_steps", "lr_scheduler_type", "warmup_steps", "optim", "bf16", "fp16", "save_steps",
            "save_total_limit", "eval_strategy", "report_to", "seed")
    return {"dry_run": True, "world_size": state.num_processes, "args": args.groups(),
            "trainer": {k: str(getattr(ta, k)) if not isinstance(getattr(ta, k), (int, float, bool, list))
                        else getattr(ta, k) for k in keys}}


def _eval_records(limit: int) -> list[dict]:
    from gptqlora.data.assets import eval_data_files
    from gptqlora.data.records import read_records

    out = []
    for f in eval_data_files():
        out += read_records(f).records[:limit]
    return out


def _accuracy(model, tokenizer, template, targs) -> dict[str, Any]:
    from gptqlora.data.dataset import template_for_kind
    from gptqlora.data.records import detect_kind
    from gptqlora.eval.accuracy import task_accuracy

    records = _eval_records(targs.eval_limit)
    return task_accuracy(model, tokenizer, records, lambda r: template_for_kind(detect_kind(r), template),
                         max_new_tokens=48, batch_size=50)


def _accuracy_of_fp_model(model_dir: str, tokenizer, template, targs, device) -> dict:
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return _accuracy(fp, tokenizer, template, targs)
