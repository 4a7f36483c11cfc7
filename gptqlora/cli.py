"""The `gptqlora` command: parses arguments, then calls the library. No work happens here."""

from __future__ import annotations

import argparse
import logging
import sys

from gptqlora import __version__

EPILOG = """Typical flow:
  gptqlora quantize MODEL_DIR OUT_DIR --bits 2 --group-size 64 --calibration data.jsonl
  gptqlora finetune --quant_checkpoint OUT_DIR --data alpaca.json --output_dir runs/my-run
  gptqlora merge runs/my-run --to fp16 --out merged/
  gptqlora chat runs/my-run
Run `gptqlora COMMAND --help` for each command's options. `gptqlora finetune` with no arguments runs
the built-in demo: a tiny bundled model, quantized to 2 bit and fine-tuned on bundled data, on a CPU."""


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize an fp16/bf16 model to a GPTQ checkpoint",
                       description="Quantize a Hugging Face causal LM (LLaMA family) with GPTQ, block by block, "
                                   "streaming weights from its safetensors files. Writes a standard GPTQ "
                                   "checkpoint (loads in gptqlora, GPTQModel and transformers) plus the "
                                   "tokenizer and quant_report.json with the per-module error.")
    p.add_argument("model_dir", help="directory with config.json, *.safetensors and tokenizer files")
    p.add_argument("out_dir", help="output directory (must not exist or be empty unless --overwrite)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=128,
                   help="input channels per quantization group; -1 = one group per output channel (default 128)")
    p.add_argument("--desc-act", action="store_true",
                   help="act-order: quantize columns by decreasing Hessian diagonal (better at low bits)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True,
                     help="symmetric quantization (default; what vLLM's fast GPTQ path needs)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric quantization (zero points)")
    p.add_argument("--static-groups", action="store_true",
                   help="compute group parameters before GPTQ updates (keeps g_idx trivial with --desc-act)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="Hessian dampening as a fraction of its mean diagonal; raised automatically if "
                        "Cholesky fails (default 0.01)")
    p.add_argument("--mse", action="store_true", help="search clipped ranges that minimise weight error")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                   help="gptq (default) or round-to-nearest, the baseline")
    p.add_argument("--format", dest="fmt", choices=("gptq", "gptq_v2"), default=None,
                   help="zero-point convention on disk: gptq (v1, AutoGPTQ-compatible; the default with --sym) "
                        "or gptq_v2 (true zeros; the default with --asym)")
    p.add_argument("--calibration", required=True,
                   help="calibration data: a .txt file, or .json/.jsonl records with a 'text' field or an "
                        "'input_ids' field (token lists, used as given)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per text calibration sample (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for picking calibration windows")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="quantize all linears of a block at once instead of qkv -> o -> gate/up -> down")
    p.add_argument("--device", default=None, help="device to quantize on (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                   help="dtype of the non-quantized weights in the output (default float16)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from gptqlora.quant.api import quantize

    report = quantize(args.model_dir, args.out_dir, args.calibration, bits=args.bits, group_size=args.group_size,
                      desc_act=args.desc_act, sym=args.sym, static_groups=args.static_groups, damp=args.damp,
                      mse=args.mse, fmt=args.fmt, method=args.method, nsamples=args.nsamples, seqlen=args.seqlen,
                      seed=args.seed, device=args.device, dtype=args.dtype, true_sequential=args.true_sequential,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    worst = max((b["rel_output_error"] for b in report.blocks), default=0.0)
    sys.stdout.write(f"wrote {args.out_dir} ({len(report.modules)} quantized modules, worst block relative "
                     f"output error {worst:.4f}, {report.seconds:.1f}s); details in quant_report.json\n")
    return 0


COMMANDS = [_add_quantize]
# Commands with their own (dataclass-built) parsers: the rest of the command line goes to them as is.
DELEGATED = {
    "finetune": ("gptqlora.finetune", "train GPTQ-LoRA adapters (no arguments: the built-in CPU demo)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptqlora", description="Fine-tune GPTQ-quantized LLMs with LoRA.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gptqlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# Errors that are the user's input, not our bug: one clear line, exit status 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from gptqlora.formats.gptq import FormatError
    from gptqlora.quant.calibration import CalibrationError
    from gptqlora.quant.config import QuantConfigError
    from gptqlora.quant.io import CheckpointError

    errors = [FormatError, CalibrationError, QuantConfigError, CheckpointError, FileExistsError,
              FileNotFoundError]
    try:
        from gptqlora.data.records import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in DELEGATED:
        import importlib

        delegate = importlib.import_module(DELEGATED[argv[0]][0]).main
        args = argparse.Namespace(command=argv[0], verbose="-v" in argv[1:],
                                  func=lambda _a: delegate([a for a in argv[1:] if a != "-v"]))
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except _user_errors() as e:
        sys.stderr.write(f"gptqlora {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
