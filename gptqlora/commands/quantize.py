"""`gptqlora quantize MODEL_DIR OUT_DIR`: an fp16/bf16 model to a GPTQ checkpoint (the one quantization path)."""

from __future__ import annotations

import argparse
import sys

from gptqlora.commands.args import add_dataclass_arguments, add_option, build_dataclasses, given_values, shard_size
from gptqlora.data.templates import DEFAULT_TEMPLATE

DESCRIPTION = ("Quantize a Hugging Face causal LM (LLaMA family) with GPTQ, block by block, streaming weights from "
               "its safetensors files. Writes a standard GPTQ checkpoint (loads in gptqlora, GPTQModel and "
               "transformers) plus the tokenizer and quant_report.json with the per-module error. --keep and "
               "--rule set precision per module (saved as GPTQModel's `dynamic`); --method spqr writes SpQR "
               "layers (gptqlora's spqr format: small groups, 3-bit statistics, fp16 outliers).")
EPILOG = r"""examples:
  gptqlora quantize llama-7b out --bits 2 --group-size 64 --calibration c.jsonl --keep ffn
  gptqlora quantize llama-7b out --bits 2 --keep crucial --crucial-from analysis/analysis.json --calibration c.jsonl
  gptqlora quantize llama-7b out --bits 3 --rule 'model\.layers\.0\..*=bits:8' --rule '.*down_proj=bits:4' ...
  gptqlora quantize llama-7b out --method spqr --bits 3 --group-size 16 --stat-bits 3 --stat-group-size 16 \
      --outlier-fraction 0.01 --calibration c.jsonl     # about 3.95 bits per weight"""
ALIASES = {"calibration_seed": ("seed",)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gptqlora.checkpoint.config import QuantConfig
    from gptqlora.quant.options import CALIBRATION_TEMPLATE_HELP, QuantizeOptions

    p.add_argument("model_dir", help="directory with config.json, *.safetensors and tokenizer files")
    p.add_argument("out_dir", help="output directory (must not exist or be empty; --overwrite replaces only a "
                                   "folder gptqlora wrote)")
    add_dataclass_arguments(p, QuantConfig, ALIASES, title="quantization", bool_values=False)
    add_dataclass_arguments(p, QuantizeOptions, ALIASES, title="calibration", bool_values=False,
                            required=("calibration",))
    add_option(p, "template", default=DEFAULT_TEMPLATE, metavar="NAME|FILE", help=CALIBRATION_TEMPLATE_HELP)
    add_option(p, "device", default=None, help="device to quantize on (default: cuda if available, else cpu)")
    add_option(p, "max_shard_size", default="2GB", type=shard_size, help="largest safetensors shard (default 2GB)")
    add_option(p, "overwrite", action="store_true",
               help="replace OUT_DIR if it exists (only a folder gptqlora wrote, never one with other files)")


def describe(report) -> str:
    """'14 quantized modules, 6 kept in fp16, 3.95 bits per weight (1.01% outliers)'."""
    s = report.summary
    text = f"{s.get('quantized_modules', len(report.modules))} quantized modules"
    if report.kept:
        text += f", {len(report.kept)} kept in full precision"
    if "avg_bits" in s:
        text += f", {s['avg_bits']:.2f} bits per weight on average"
        if report.kept:
            text += f" ({s.get('avg_bits_quantized', 0):.2f} in the quantized ones)"
    if "outlier_fraction" in s:
        text += f", {100 * s['outlier_fraction']:.2f}% outliers"
    return text


def run(args: argparse.Namespace) -> int:
    from gptqlora.checkpoint.config import QuantConfig
    from gptqlora.checkpoint.io import CheckpointError
    from gptqlora.data.templates import PromptTemplate
    from gptqlora.devices import check_device
    from gptqlora.paths import check_output, require_dir, require_file
    from gptqlora.quant.api import QuantizeOptions, TrainingData, quantize

    classes = [QuantConfig, QuantizeOptions]
    qcfg, options = build_dataclasses(classes, given_values(args, classes))
    # everything checked before anything is written; inputs are local folders and files
    model_dir = require_dir(args.model_dir, "MODEL_DIR", "model folder")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"MODEL_DIR {args.model_dir}: no config.json; not a Hugging Face model folder")
    require_file(options.calibration, "--calibration", "calibration file")
    template = PromptTemplate.load(args.template)  # its records render as finetune --template renders them
    check_device(args.device)
    check_output(args.out_dir, "OUT_DIR", {f"MODEL_DIR {args.model_dir}": model_dir,
                                           f"--calibration {options.calibration}": options.calibration},
                 overwrite=args.overwrite, kind="quantized model")
    report = quantize(args.model_dir, args.out_dir, qcfg, options, training=TrainingData((), template),
                      device=args.device, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    worst = max((b["rel_output_error"] for b in report.blocks), default=0.0)
    sys.stdout.write(f"wrote {args.out_dir} ({describe(report)}, worst block relative output error {worst:.4f}, "
                     f"{report.seconds:.1f}s); details in quant_report.json\n")
    return 0
