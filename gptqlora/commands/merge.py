"""`gptqlora merge`: fold a run's adapter into its base, layer by layer.

    --to fp16   dequantize the base, add B·A·scaling, write a plain Hugging Face model
    --to gptq   the same, then quantize it again (the one quantization path) into a GPTQ checkpoint
    --exact     QA-LoRA adapters only: fold the adapter into the quantized zeros, no re-quantization

The merge itself is `merging`, imported (with torch) when the command runs: `--help` and a parse error
come at once.
"""

from __future__ import annotations

import argparse
import sys

from gptqlora.commands.args import add_dataclass_arguments, add_option, build_dataclasses, given_values, shard_size

# The merge's names, importable from here as before it moved to `merging` (which imports torch on first use).
_MERGING = ("MergedSource", "merge_to_fp16", "merge_to_gptq", "merge_exact")


def __getattr__(name: str):
    if name in _MERGING:
        from gptqlora.commands import merging

        return getattr(merging, name)
    raise AttributeError(f"module 'gptqlora.commands.merge' has no attribute {name!r}")


DESCRIPTION = ("Fold a run's LoRA adapter into its quantized base, streaming layer by layer. --to fp16: a plain "
               "Hugging Face model that loads without gptqlora. --to gptq: merged, then quantized again "
               "(calibrated on the run's training data unless --calibration). --exact: QA-LoRA adapters folded "
               "into the zeros with no re-quantization (float zeros; gptqlora loads it, other GPTQ loaders do not).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gptqlora.checkpoint.config import QuantConfig
    from gptqlora.quant.options import QuantizeOptions

    p.add_argument("run_dir", help="the run folder written by `gptqlora finetune`")
    add_option(p, "to", choices=("fp16", "bf16", "gptq"), default="fp16", help="output kind (default fp16)")
    add_option(p, "exact", action="store_true", help="QA-LoRA only: fold into the zeros, exactly")
    add_option(p, "out", required=True, help="output directory (refused if it exists, unless --overwrite; never "
                                             "the run folder or a folder holding it)")
    add_option(p, "device", default=None, help="device for --to gptq (default: cuda if available)")
    add_option(p, "max_shard_size", default="2GB", type=shard_size, help="largest safetensors shard (default 2GB)")
    add_option(p, "overwrite", action="store_true",
               help="replace --out if it exists (only a folder gptqlora wrote, never one with other files)")
    add_dataclass_arguments(p, QuantConfig, title="--to gptq: quantization", bool_values=False)
    add_dataclass_arguments(p, QuantizeOptions, title="--to gptq: calibration", bool_values=False)


def run(args: argparse.Namespace) -> int:
    import torch

    from gptqlora.checkpoint.config import QuantConfig, read_quant_config
    from gptqlora.commands.merging import merge_exact, merge_to_fp16, merge_to_gptq
    from gptqlora.devices import check_device
    from gptqlora.quant.options import QuantizeOptions

    check_device(args.device)
    if args.exact:
        out = merge_exact(args.run_dir, args.out, args.overwrite, args.max_shard_size)
        sys.stdout.write(f"wrote {out}: exact QA-LoRA merge (format {read_quant_config(out).format})\n")
    elif args.to == "gptq":
        classes = [QuantConfig, QuantizeOptions]
        qcfg, options = build_dataclasses(classes, given_values(args, classes))
        rep = merge_to_gptq(args.run_dir, args.out, qcfg, options, args.device, args.overwrite, args.max_shard_size)
        sys.stdout.write(f"wrote {args.out}: merged and re-quantized to {qcfg.bits} bit; relative output error "
                         f"against the fp16 merge, worst block: {rep['worst_block_rel_error']:.4f}\n")
    else:
        dtype = torch.bfloat16 if args.to == "bf16" else torch.float16
        merge_to_fp16(args.run_dir, args.out, dtype, args.max_shard_size, args.overwrite)
        sys.stdout.write(f"wrote {args.out}: a plain {args.to} model (AutoModelForCausalLM.from_pretrained)\n")
    return 0
