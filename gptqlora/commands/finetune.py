"""`gptqlora finetune`: GPTQ-LoRA training, from a GPTQ checkpoint (or an fp16 model quantized first).

With no arguments it runs the built-in demo: the bundled tiny LLaMA, quantized to 2 bit, trained on the
bundled Alpaca-style and CoT synthetic data, with task accuracy measured before and after.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import random
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptqlora.commands.args import OptionError, add_dataclass_arguments, build_dataclasses, read_yaml_config

if TYPE_CHECKING:  # torch loads where the job runs: `finetune --help` and parse errors need none of it
    import torch

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
    from gptqlora.quant.options import QuantizeOptions
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
    config: str | None = None  # the --config file
    from_config: frozenset[str] = field(default_factory=frozenset)  # names set by the config file (not flags)

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
    from_config = frozenset(values) - frozenset(ns)
    values.update(ns)
    given = frozenset(values)
    if not values.get("quant_checkpoint") and not values.get("base_model"):
        values = {**DEMO_DEFAULTS, **values}
    parts = build_dataclasses(arg_classes(), values, where=f"{config}: " if config else "")
    return FinetuneArgs(*parts, given=given, config=config, from_config=from_config)


def run(args: argparse.Namespace) -> int:
    ns = {k: v for k, v in vars(args).items() if k not in ("command", "func", "verbose", "command_parser")}
    return report(finetune(args_from(ns)))


def main(argv: list[str] | None = None) -> int:
    return report(finetune(parse_args(sys.argv[1:] if argv is None else argv)))


def report(summary: dict[str, Any]) -> int:
    if summary.get("dry_run"):
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return 0
    acc = summary["accuracy"]
    lines = [f"run folder: {summary['run_dir']}  (steps {summary['steps']}, mean train loss "
             f"{summary['train_loss']:.4f})"]
    if acc:
        lines.append("task accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    lines.append(f"next: gptqlora chat {summary['run_dir']}   |   gptqlora merge {summary['run_dir']} --to fp16 "
                 f"--out merged/")
    if summary.get("demo"):  # the bundled tiny model knows its synthetic tasks only, one turn at a time
        lines.append("      (the demo's tiny model answers its tasks' prompts, e.g. \"What is 12 + 7?\" or "
                     "\"Reverse the word 'abc'.\"; /reset between them)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run the whole job; returns a summary (also in RUN/run.json and RUN/eval.json).

    Everything that can be wrong with the input is found before the run folder appears: a new run is built
    in a temporary sibling (data, tokenizer, base quantization, model load, adapter wrap) and put in place
    only once training is about to start, so a failed start leaves nothing that blocks the retry."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from gptqlora.data.assets import default_data_files, tiny_model_dir
    from gptqlora.devices import check_device, configure_cuda_allocator
    from gptqlora.run import Run, default_run_dir
    from gptqlora.train.trainer import resume_path

    margs, dargs, largs, targs = args.model, args.data, args.lora, args.train
    if not margs.quant_checkpoint:  # this run quantizes --base_model (or the demo's model) itself
        args.quant = base_quant_config(args)
    if targs.dry_run:
        return _dry_run(args)
    if largs.adapter_name not in ("gptqlora", "lora"):
        raise OptionError(f"--adapter_name {largs.adapter_name!r}: only 'gptqlora' (LoRA) is supported")
    check_device(targs.device, "--device")
    if targs.compile == "blocks" and targs.offload_activations:
        raise OptionError("--compile blocks with --offload_activations is not supported (the offload hooks "
                          "would be traced into the compiled blocks); drop one of them")
    configure_cuda_allocator(targs.expandable_segments and targs.device != "cpu")  # before any CUDA memory
    demo = not margs.quant_checkpoint and not margs.base_model
    if demo:
        margs.base_model = str(tiny_model_dir())
    from gptqlora.adapters.config import FP_INITS

    if largs.init_method in FP_INITS and not margs.base_model:
        raise OptionError(f"--init_method {largs.init_method} needs --base_model (the fp16 model whose "
                          f"quantization residual it factorizes)")
    data_files = [str(p) for p in (dargs.data or default_data_files())]
    inputs = _check_inputs(args, data_files)
    _check_checkpoint(args)
    state = PartialState(cpu=targs.device == "cpu")
    # the same folder on every rank: the main process names it
    root = Path(targs.output_dir) if targs.output_dir else broadcast_object_list([default_run_dir()])[0]
    resuming = _resuming(targs.resume_from_checkpoint)
    if state.is_main_process:
        Run.check(root, targs.overwrite, resuming, inputs)  # before the data is read (and logged)
    random.seed(targs.seed)
    torch.manual_seed(targs.seed)
    tokenizer, template, train_ds, val_ds = _data(args, data_files)
    run = Run.start(root, targs.overwrite, resuming, inputs) \
        if state.is_main_process else None
    try:
        if state.is_main_process:
            base_dir = Path(margs.quant_checkpoint) if margs.quant_checkpoint else run.own_base_dir
            if not margs.quant_checkpoint and not (base_dir / "config.json").is_file():
                _quantize_base(args, data_files, template, tokenizer, base_dir, state.device)
            model, evals, peft_model = _load_and_wrap(args, base_dir, data_files, tokenizer, template, state.device, demo)
            run.record(base_dir, data_files, _kinds(data_files), template, demo=demo,
                       base_model=str(Path(margs.base_model).resolve()) if margs.base_model else None,
                       args=args.groups(), versions=_versions())
            run.save_tokenizer(tokenizer)
            run.publish()
            if not margs.quant_checkpoint:  # the base now lives in the published run, not in its staging folder
                _point_at_base(model, peft_model, run.own_base_dir)
    except BaseException:
        if run is not None:
            run.discard()
        raise
    state.wait_for_everyone()
    if not state.is_main_process:
        run = Run(root)
        base_dir = Path(margs.quant_checkpoint) if margs.quant_checkpoint else run.own_base_dir
        model, evals, peft_model = _load_and_wrap(args, base_dir, data_files, tokenizer, template, state.device, demo)

    trainer = _trainer(peft_model, tokenizer, train_ds, val_ds, run, targs, state)
    resume = resume_path(run.checkpoints_dir, targs.resume_from_checkpoint)
    result = trainer.train(resume_from_checkpoint=resume)
    if peft_model.compiled == "blocks":  # compiled for training only: the evaluation below generates
        from gptqlora.train.compile import uncompile_blocks

        uncompile_blocks(peft_model)
    if state.is_main_process:
        run.save_adapter(peft_model)
    if targs.eval_accuracy:
        evals["quantized+lora"] = _accuracy(peft_model, tokenizer, template, targs, "quantized+lora")
    plan = peft_model.checkpointing_plan
    summary = {"run_dir": str(run.root), "train_loss": _mean_train_loss(trainer, result, resume),
               "steps": result.global_step, "accuracy": {k: v["accuracy"] for k, v in evals.items()},
               "checkpointing": {"mode": plan.mode, "blocks_recomputed": len(plan.checkpointed), "why": plan.reason},
               "lora_init": getattr(peft_model, "lora_init", None), "compile": getattr(peft_model, "compiled", None),
               "demo": demo}
    if state.is_main_process:
        run.update(quant_config=model.gptq_config.to_dict(), result=summary)
        if evals:
            run.write_eval(evals)
    return summary


def _point_at_base(model, peft_model, base_dir: Path) -> None:
    """Where the loaded model says it came from (PEFT reads it when saving checkpoints)."""
    model.config.name_or_path = str(base_dir)
    if "name_or_path" in model.__dict__:
        model.name_or_path = str(base_dir)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(base_dir)


def _resuming(value: str | None) -> bool:
    return value is not None and str(value).strip().lower() not in ("", "0", "false", "no", "n", "off", "none")


def _label(args: FinetuneArgs, name: str) -> str:
    """How to name an argument in a message: the flag, or the config file's key it came from."""
    return f"{args.config}: {name}" if name in args.from_config else f"--{name}"


def _check_inputs(args: FinetuneArgs, data_files: list[str]) -> dict[str, str]:
    """Every input path exists (local only: nothing is looked up on the Hub), before anything is written;
    returns them by label, for the output rules."""
    from gptqlora.paths import require_dir, require_file

    margs, dargs, qopts = args.model, args.data, args.quantize
    inputs: dict[str, str] = {}
    for name in ("quant_checkpoint", "base_model"):
        value = getattr(margs, name)
        if value:
            require_dir(value, _label(args, name), "model folder")
            inputs[f"--{name} {value}"] = value
    for f in data_files:
        require_file(f, _label(args, "data"), "data file")
        inputs[f"--data {f}"] = f
    if qopts.calibration:
        require_file(qopts.calibration, _label(args, "calibration"), "calibration file")
        inputs[f"--calibration {qopts.calibration}"] = qopts.calibration
    if args.config:
        inputs[f"--config {args.config}"] = args.config
    if Path(dargs.template).suffix == ".json" or Path(dargs.template).exists():
        inputs[f"--template {dargs.template}"] = dargs.template
    return inputs


def _check_checkpoint(args: FinetuneArgs) -> None:
    """What the checkpoint's files tell without loading it: intact safetensors headers, the bit width a
    given --bits must match, and layers for every --target_modules entry."""
    from gptqlora.adapters.model import AdapterError, _matches
    from gptqlora.checkpoint.config import read_quant_config
    from gptqlora.checkpoint.io import SafetensorsSource

    model_dir = args.model.quant_checkpoint or args.model.base_model
    src = SafetensorsSource(model_dir)
    keys = src.keys()
    if not args.model.quant_checkpoint and read_quant_config(model_dir) is not None:  # before quantizing anything
        raise OptionError(f"{_label(args, 'base_model')} {model_dir} is already quantized (its config.json has "
                          f"quantization_config): pass it as --quant_checkpoint {model_dir}, or give the fp16/bf16 "
                          f"model to --base_model")
    if args.model.quant_checkpoint:
        qcfg = read_quant_config(model_dir)
        if qcfg is not None and "bits" in args.given and args.quant.bits != qcfg.bits:
            raise OptionError(f"{_label(args, 'bits')} {args.quant.bits}, but {model_dir} is a {qcfg.bits}-bit "
                              f"checkpoint; drop --bits or give the matching checkpoint")
    modules = {k.rsplit(".", 1)[0] for k in keys}
    targets = list(args.lora.target_modules)
    missing = [t for t in targets if not any(_matches(m, [t]) for m in modules)]
    if missing:
        linear = {k.rsplit(".", 1)[0] for k in keys if "layers." in k and (k.endswith(".qweight") or (
            k.endswith(".weight") and len(src.shape(k)) == 2))}  # norms' weights are 1-D: not LoRA targets
        leaves = sorted({m.rsplit(".", 1)[-1] for m in linear})
        near = {t: difflib.get_close_matches(t, leaves, n=1) for t in missing}
        hint = "; ".join(f"did you mean {v[0]!r} for {t!r}?" for t, v in near.items() if v)
        raise AdapterError(f"{_label(args, 'target_modules')} {missing} match no layer of {model_dir}; its "
                           f"linear layers are named {leaves}" + (f" ({hint})" if hint else ""))


def _data(args: FinetuneArgs, data_files: list[str]):
    """The tokenizer, the template and the datasets (bad records fail here, before any heavy work)."""
    from transformers import AutoTokenizer

    from gptqlora.data.dataset import build_datasets
    from gptqlora.data.templates import PromptTemplate

    margs, dargs = args.model, args.data
    src = margs.quant_checkpoint or margs.base_model
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        raise OptionError(f"{src}: cannot load its tokenizer ({str(e).splitlines()[0]}); the model folder needs "
                          f"tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = PromptTemplate.load(dargs.template)
    train_ds, val_ds = build_datasets(data_files, tokenizer, template, dargs.cutoff_len, dargs.train_on_inputs,
                                      dargs.val_set_size, args.train.seed, dargs.packing)
    return tokenizer, template, train_ds, val_ds


def _kinds(data_files: list[str]) -> set[str]:
    from gptqlora.data.records import read_records

    return {read_records(f).kind for f in data_files}


def _load_and_wrap(args: FinetuneArgs, base_dir: Path, data_files: list[str], tokenizer, template, device,
                   demo: bool):
    """The quantized model (checked against --bits), the accuracy before training, and the PEFT model."""
    from gptqlora.checkpoint.checkpoint import load_quantized
    from gptqlora.devices import default_dtype

    margs, targs = args.model, args.train
    model = load_quantized(base_dir, device=device, dtype=default_dtype(device))
    if "bits" in args.given and margs.quant_checkpoint and args.quant.bits != model.gptq_config.bits:
        raise OptionError(f"{_label(args, 'bits')} {args.quant.bits}, but {base_dir} is a "
                          f"{model.gptq_config.bits}-bit checkpoint; drop --bits or give the matching checkpoint")
    evals: dict[str, Any] = {}
    if targs.eval_accuracy:
        if demo:
            evals["fp16"] = _accuracy_of_fp_model(margs.base_model, tokenizer, template, targs, device)
        evals["quantized"] = _accuracy(model, tokenizer, template, targs, "quantized")
    return model, evals, _wrap(model, args, lambda: _init_calibration(args, data_files, template, tokenizer))


def _mean_train_loss(trainer, result, resume: str | None) -> float:
    """The mean training loss over all steps. After a resume the Trainer's own figure covers only the steps
    of this session; the steps before come from the logged losses up to the checkpoint."""
    if not resume:
        return result.training_loss
    start = int(Path(resume).name.rpartition("-")[2] or 0) if Path(resume).name.startswith("checkpoint-") else 0
    before = [r["loss"] for r in trainer.state.log_history if "loss" in r and r.get("step", 0) <= start]
    total = result.global_step
    if not before or not 0 < start < total:
        return result.training_loss
    return (sum(before) / len(before) * start + result.training_loss * (total - start)) / total


def _versions() -> dict[str, str]:
    import peft
    import torch
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


def _init_calibration(args: FinetuneArgs, data_files: list[str], template, tokenizer):
    """Token windows for init_method aware and output: --calibration, else the training data (as quantization uses)."""
    from gptqlora.quant.api import TrainingData, calibration_samples

    return calibration_samples(args.quantize, tokenizer, TrainingData(data_files, template, args.data.cutoff_len))


AUTO_SVD_BITS = 3  # --init_method auto: svd at and below this width


def resolve_init(choice: str, bits: int, have_fp_weights: bool) -> str:
    """--init_method auto: svd for a base of <= 3 bits when the fp weights are at hand, else B = 0. Measured
    (docs/results.md, the man-page model at 2 bit, 120 distillation steps): SVD closed 66.9% of the held-out
    gap against 51.9% from B = 0 (GPTAQ off) and 54.1% against 32.1% (GPTAQ on); on the tiny model they
    tie (90% / 88%). At 4 bit there is little gap to close and B = 0 costs nothing."""
    if choice != "auto":
        return choice
    return "svd" if have_fp_weights and bits <= AUTO_SVD_BITS else "default"


def base_quant_config(args: FinetuneArgs):
    """The QuantConfig this run quantizes its base with: --gptaq 0 (plain GPTQ) in place of the quantizer's
    default GPTAQ when the LoRA init (after --init_method auto) restores the fp weights (svd, aware, output)
    and --gptaq was not given. Measured (docs/results.md, the man-page model at 2 bit g64 act-order, 120
    distillation steps, four calibration seeds in one environment): GPTAQ leaves the smaller gap before
    training, but every fp init restores W_fp, undoing GPTAQ's deliberate move away from it, and from the
    plain GPTQ base the SVD inits end with the lower held-out perplexity."""
    from gptqlora.adapters.config import FP_INITS

    q = args.quant
    init = resolve_init(args.lora.init_method, q.bits, True)
    if init not in FP_INITS or "gptaq" in args.given or not q.gptaq:
        return q
    log.info("quantizing with --gptaq 0: the %s init restores the fp16 weights, and from a base quantized "
             "without GPTAQ it ends closer to the fp16 model (docs/results.md); pass --gptaq to choose", init)
    return replace(q, gptaq=0.0)


def _wrap(model, args: FinetuneArgs, calibration=None):
    """The PEFT model; `calibration` (a function giving token windows) is called only for init aware/output."""
    from gptqlora.adapters import GPTQLoraConfig, get_peft_model
    from gptqlora.adapters.config import CALIBRATED_INITS, FP_INITS
    from gptqlora.train import checkpointing
    from gptqlora.train.compile import compile_blocks, resolve_compile
    from gptqlora.train.liger import apply_liger
    from gptqlora.train.loss import apply_chunked_loss
    from gptqlora.train.trainer import autocast_dtype

    largs, targs, dargs = args.lora, args.train, args.data
    init = resolve_init(largs.init_method, getattr(getattr(model, "gptq_config", None), "bits", 16),
                        bool(args.model.base_model))
    if init in FP_INITS and not args.model.base_model:
        raise OptionError(f"--init_method {init} needs the fp16 model's weights: pass --base_model (with "
                         f"--quant_checkpoint, the fp16 model it was quantized from)")
    log.info("LoRA init: %s%s", init, " (--init_method auto)" if largs.init_method == "auto" else "")
    model.config.use_cache = False
    device = next(model.parameters()).device
    compiled = resolve_compile(targs.compile, device, targs.offload_activations)
    fused_loss = apply_liger(model, targs.liger, blocks=compiled == "none")  # its fused linear + CE comes with it
    if targs.loss == "chunked" or (targs.loss == "auto" and not fused_loss):
        apply_chunked_loss(model)
    qa_group = largs.qalora_group_size or model.gptq_config.group_size
    config = GPTQLoraConfig(r=largs.lora_r, lora_alpha=largs.lora_alpha, lora_dropout=largs.lora_dropout,
                            target_modules=list(largs.target_modules), lora_dtype=largs.lora_dtype,
                            init_method=init, svd_iters=largs.svd_iters,
                            svd_source=args.model.base_model if init in FP_INITS else None,
                            use_qalora=largs.use_qalora, qalora_group_size=qa_group)
    peft_model = get_peft_model(model, config,
                                calibration=calibration() if init in CALIBRATED_INITS and calibration else None)
    peft_model.lora_init = init  # recorded in run.json's result (what --init_method auto chose)
    peft_model.compiled = compiled  # and what --compile auto chose
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("trainable LoRA parameters: %s", f"{n_train:,}")
    mode = checkpointing.resolve_mode(targs.use_gradient_checkpointing, targs.gradient_checkpointing)
    peft_model.checkpointing_plan = checkpointing.setup(  # recorded in run.json's result
        peft_model, mode, fraction=targs.checkpoint_fraction, batch=targs.micro_batch_size, seq=dargs.cutoff_len,
        dtype=autocast_dtype(targs, device), optim=targs.optim, reentrant=targs.reentrant_checkpointing,
        offload=targs.offload_activations)
    if compiled == "blocks":
        compile_blocks(peft_model)
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


def _accuracy(model, tokenizer, template, targs, what: str) -> dict[str, Any]:
    from gptqlora.data.dataset import template_for_kind
    from gptqlora.data.records import detect_kind
    from gptqlora.eval.accuracy import task_accuracy

    records = _eval_records(targs.eval_limit)
    log.info("task accuracy of the %s model on %d records", what, len(records))
    return task_accuracy(model, tokenizer, records, lambda r: template_for_kind(detect_kind(r), template),
                         max_new_tokens=48, batch_size=50, progress=True)


def _accuracy_of_fp_model(model_dir: str, tokenizer, template, targs, device) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).to(device)
    return _accuracy(fp, tokenizer, template, targs, "fp16")
