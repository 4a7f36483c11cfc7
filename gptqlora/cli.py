"""The `gptqlora` command: parses arguments, then calls the library. No work happens here."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

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


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What `chat` and `generate` share: which model, how prompts are rendered, how to sample."""
    p.add_argument("run_dir", nargs="?", help="the run folder written by `gptqlora finetune`")
    p.add_argument("--base", help="a quantized checkpoint to use instead of a run folder")
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="[NAME=]PATH",
                   help="load a LoRA adapter (a PEFT folder or a run folder); repeat for several; the first "
                        "loaded (the run's own, with RUN_DIR) is active")
    p.add_argument("--template", help="prompt template name or JSON file (default: the run's; alpaca with --base)")
    p.add_argument("--chat-template", action="store_true",
                   help="render with the tokenizer's chat template (the default when the run trained on chat data)")
    p.add_argument("--system", help="system message (chat template) or a paragraph put before the prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens of prompt + reply (default: the model's max_position_embeddings)")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


def _sampling(args: argparse.Namespace):
    from gptqlora.generate import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a run's model in the terminal",
                       description="Interactive chat that streams the reply as it is generated. Earlier turns "
                                   "stay in the prompt (the oldest are dropped to fit the context). Commands: "
                                   "/reset, /adapter NAME, /adapter off, /adapters, /help, /exit. Ctrl-C stops a "
                                   "reply; Ctrl-D (or Ctrl-C at the prompt) quits.")
    _add_model_options(p)
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from gptqlora.chat import run_chat_command

    return run_chat_command(args.run_dir, args.base, args.adapters, args.template, args.chat_template, args.system,
                            _sampling(args), args.max_context, args.device, args.seed)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate responses for a file of prompts (JSON lines out)",
                       description="Batched generation: one JSON line {\"prompt\", \"response\", \"adapter\"} per "
                                   "prompt (per adapter with --use a,b), in input order, on stdout.")
    _add_model_options(p)
    p.add_argument("--prompts", required=True,
                   help="one prompt per line, or .jsonl with a \"prompt\" field (other fields are copied to "
                        "the output); - reads stdin")
    p.add_argument("--format", dest="file_format", choices=("auto", "text", "jsonl"), default="auto",
                   help="prompts file format (default: jsonl for *.jsonl, else text)")
    p.add_argument("--use", default=None, metavar="NAME[,NAME...]",
                   help="adapters to generate with, comma-separated; off = the base model (default: the first)")
    p.add_argument("--raw", action="store_true", help="give prompts to the model as is, without a template")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from gptqlora.generate import run_generate

    use = [u.strip() for u in args.use.split(",") if u.strip()] if args.use else []
    return run_generate(args.prompts, args.run_dir, args.base, args.adapters, use, args.template, args.chat_template,
                        args.raw, args.system, _sampling(args), args.batch_size, args.max_context,
                        args.file_format, args.device, args.seed)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a run's adapter into its base (fp16, GPTQ, or exact)",
                       description="Fold a run's LoRA adapter into its quantized base, streaming layer by layer. "
                                   "--to fp16: a plain Hugging Face model that loads without gptqlora. --to gptq: "
                                   "merged, then GPTQ-quantized again (calibrated on the run's training data). "
                                   "--exact: QA-LoRA adapters folded into the zeros with no re-quantization "
                                   "(float zeros; gptqlora loads it, other GPTQ loaders do not).")
    p.add_argument("run_dir", help="the run folder written by `gptqlora finetune`")
    p.add_argument("--to", choices=("fp16", "bf16", "gptq"), default="fp16", help="output kind (default fp16)")
    p.add_argument("--exact", action="store_true", help="QA-LoRA only: fold into the zeros, exactly")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4, help="--to gptq: bits (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="--to gptq: group size (default 128)")
    p.add_argument("--desc-act", action="store_true", help="--to gptq: act-order")
    p.add_argument("--asym", dest="sym", action="store_false", help="--to gptq: asymmetric (default symmetric)")
    p.add_argument("--calibration", help="--to gptq: calibration file (default: the run's training data)")
    p.add_argument("--nsamples", type=int, default=128, help="--to gptq: calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="--to gptq: tokens per sample (default 512)")
    p.add_argument("--device", default=None, help="device for --to gptq (default: cuda if available)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    import torch

    from gptqlora import merge

    if args.exact:
        merge.merge_exact(args.run_dir, args.out, args.overwrite, args.max_shard_size)
        sys.stdout.write(f"wrote {args.out}: exact QA-LoRA merge (format gptq_v2_float_zeros)\n")
    elif args.to == "gptq":
        rep = merge.merge_to_gptq(args.run_dir, args.out, args.bits, args.group_size, args.desc_act, args.sym,
                                  args.calibration, args.nsamples, args.seqlen, args.device, args.overwrite,
                                  args.max_shard_size)
        sys.stdout.write(f"wrote {args.out}: merged and re-quantized to {args.bits} bit; relative output error "
                         f"against the fp16 merge, worst block: {rep['worst_block_rel_error']:.4f}\n")
    else:
        dtype = torch.bfloat16 if args.to == "bf16" else torch.float16
        merge.merge_to_fp16(args.run_dir, args.out, dtype, args.max_shard_size, args.overwrite)
        sys.stdout.write(f"wrote {args.out}: a plain {args.to} model (AutoModelForCausalLM.from_pretrained)\n")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run for a serving engine (vLLM)",
                       description="Write OUT/adapter (a PEFT LoRA adapter checked against vLLM's limits), "
                                   "OUT/base (the symmetric GPTQ base) and OUT/README.md with the vllm command.")
    p.add_argument("run_dir", help="the run folder written by `gptqlora finetune`")
    p.add_argument("--format", choices=("vllm",), default="vllm", help="target engine (default vllm)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--pad-rank", action="store_true",
                   help="zero-pad a rank vLLM refuses up to the next one it accepts (exact)")
    p.add_argument("--name", help="the adapter's name in the vllm command (default: the run folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from gptqlora.export import export_vllm

    out = export_vllm(args.run_dir, args.out, args.pad_rank, args.name, args.overwrite)
    sys.stdout.write(f"wrote {out}; see {out}/README.md for the vllm command\n")
    return 0


COMMANDS = [_add_quantize, _add_merge, _add_export, _add_chat, _add_generate]
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
    for add in COMMANDS[:1]:  # the order of the workflow: quantize, finetune, then the rest
        add(sub)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    for add in COMMANDS[1:]:
        add(sub)
    return parser


# Errors that are the user's input, not our bug: one clear line, exit status 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from gptqlora.formats.gptq import FormatError
    from gptqlora.quant.calibration import CalibrationError
    from gptqlora.quant.config import QuantConfigError
    from gptqlora.quant.io import CheckpointError

    from gptqlora.adapters.model import AdapterError
    from gptqlora.export import ExportError
    from gptqlora.generate import InferenceError
    from gptqlora.run import RunError
    from gptqlora.trainer import NonFiniteLossError

    errors = [FormatError, CalibrationError, QuantConfigError, CheckpointError, FileExistsError,
              FileNotFoundError, AdapterError, ExportError, RunError, NonFiniteLossError,
              InferenceError]
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
    # transformers deprecation noise raised from inside PEFT, not actionable by our users
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
