"""`gptqlora analyze MODEL_DIR --calibration FILE --out DIR`: quantization sensitivity and activation outliers.

Writes DIR/analysis.json, DIR/gptq_error.png (heat map: layers x modules, one panel per bit width) and
DIR/activation_outliers.png. `quantize --keep crucial --crucial-from DIR/analysis.json` reuses the errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gptqlora.commands.args import add_option, str2list
from gptqlora.data.templates import DEFAULT_TEMPLATE

log = logging.getLogger(__name__)

DESCRIPTION = ("Measure how much each linear layer suffers from quantization and where the activation outliers "
               "are, streaming the fp16/bf16 model block by block on calibration data: each module's GPTQ error "
               "at 2, 3 and 4 bit (the solver's loss and the relative output error), and the input dims where "
               "|x| exceeds a threshold (LLM.int8 style). Writes analysis.json and two PNG plots.")
EPILOG = """example:
  gptqlora analyze models/llama-7b --calibration calib.jsonl --out analysis/
  gptqlora quantize models/llama-7b out --bits 2 --keep crucial --crucial-from analysis/analysis.json ..."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gptqlora.quant.options import CALIBRATION_TEMPLATE_HELP

    p.add_argument("model_dir", help="an fp16/bf16 model directory (config.json, *.safetensors, tokenizer)")
    add_option(p, "calibration", required=True,
               help="calibration data: .txt, or .json/.jsonl records with 'text', 'input_ids' (token lists) or "
                    "training records (Alpaca, CoT, chat; rendered with --template)")
    add_option(p, "template", default=DEFAULT_TEMPLATE, metavar="NAME|FILE", help=CALIBRATION_TEMPLATE_HELP)
    add_option(p, "out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    add_option(p, "bits", type=str2list, default=["2", "3", "4"], help="bit widths to measure (default 2,3,4)")
    add_option(p, "group_size", type=int, default=128, help="GPTQ group size (default 128; -1 = per channel)")
    add_option(p, "desc_act", action="store_true", help="GPTQ act-order")
    add_option(p, "asym", action="store_true", help="asymmetric GPTQ (default symmetric)")
    add_option(p, "nsamples", type=int, default=32, help="calibration samples (default 32)")
    add_option(p, "seqlen", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    add_option(p, "calibration_seed", "--seed", type=int, default=0, help="seed for picking samples (default 0)")
    add_option(p, "act_threshold", type=float, default=6.0,
               help="an activation |x| above this is an outlier (default 6, LLM.int8's)")
    add_option(p, "top_k", type=int, default=10, help="outlier dims listed per input site (default 10)")
    add_option(p, "device", default=None, help="device (default: cuda if available, else cpu)")
    add_option(p, "no_plots", action="store_true", help="write analysis.json only")
    add_option(p, "overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from gptqlora.checkpoint.config import QuantConfigError
    from gptqlora.checkpoint.io import atomic_output_dir
    from gptqlora.eval.plots import PlotsUnavailable, error_heatmap, outlier_plot
    from gptqlora.quant.analysis import analyze_model
    from gptqlora.data.templates import PromptTemplate
    from gptqlora.quant.api import QuantizeOptions, TrainingData, calibration_samples

    try:
        bits = tuple(int(b) for b in args.bits)
    except ValueError:
        raise QuantConfigError(f"--bits {','.join(args.bits)}: give bit widths such as 2,3,4") from None
    bad = [b for b in bits if b not in (2, 3, 4, 8)]
    if bad or not bits:
        raise QuantConfigError(f"--bits: {bad or 'none given'}; GPTQ packs 2, 3, 4 and 8 bit")
    if args.group_size == 0 or args.group_size < -1:
        raise QuantConfigError(f"--group-size {args.group_size}: must be -1 or positive")
    template = PromptTemplate.load(args.template)  # a bad name fails before the model is read
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    samples = calibration_samples(QuantizeOptions(calibration=args.calibration, nsamples=args.nsamples,
                                                  seqlen=args.seqlen, calibration_seed=args.calibration_seed),
                                  tokenizer, TrainingData((), template))
    with atomic_output_dir(args.out, args.overwrite) as tmp:  # nothing half-written on failure
        result = analyze_model(args.model_dir, samples, bits, args.group_size, args.desc_act, not args.asym,
                               act_threshold=args.act_threshold, top_k=args.top_k, device=args.device)
        (tmp / "analysis.json").write_text(json.dumps(result, indent=1))
        written = ["analysis.json"]
        if not args.no_plots:
            try:
                written += [error_heatmap(result, tmp / "gptq_error.png").name,
                            outlier_plot(result, tmp / "activation_outliers.png").name]
            except PlotsUnavailable as e:
                log.warning("plots skipped: %s", e)
    sys.stdout.write(f"wrote {args.out}: {', '.join(written)}\n{summary(result)}\n")
    return 0


def summary(result: dict) -> str:
    """A few lines: the most sensitive modules at the lowest bit width; the most common outlier dims."""
    low = str(min(result["bits"]))
    rel = result["rel_error"][low]
    worst = sorted(rel, key=rel.get, reverse=True)[:3]
    lines = [f"most sensitive at {low} bit: " + ", ".join(f"{n} ({rel[n]:.3g})" for n in worst)]
    for site, v in result.get("activation_outliers", {}).get("sites", {}).items():
        if v["top"]:
            top = ", ".join(f"{t['dim']} ({t['n_layers']} layers)" for t in v["top"][:5])
            lines.append(f"outlier dims at {site.rsplit('.', 1)[-1]} input: {top}")
    return "\n".join(lines)
