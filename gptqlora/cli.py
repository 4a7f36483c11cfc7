"""The `gptqlora` command: finds the subcommand, lets it declare its options, parses, then calls it.

Each command lives in `gptqlora.commands.<name>` with `DESCRIPTION`, `add_arguments(parser)` and
`run(args) -> exit status`; only the command being run is imported. No work happens here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from gptqlora import __version__

EPILOG = """Typical flow:
  gptqlora quantize MODEL_DIR OUT_DIR --bits 2 --group-size 64 --calibration data.jsonl
  gptqlora finetune --quant_checkpoint OUT_DIR --data alpaca.json --output_dir runs/my-run
  gptqlora merge runs/my-run --to fp16 --out merged/
  gptqlora chat runs/my-run
Run `gptqlora COMMAND --help` for each command's options (written --snake_case or --kebab-case, as you
like). `gptqlora finetune` with no arguments runs the built-in demo: a tiny bundled model, quantized to
2 bit and fine-tuned on bundled data, on a CPU."""

# In the order of the workflow: name -> one line for `gptqlora --help`.
COMMANDS = {
    "quantize": "quantize an fp16/bf16 model to a GPTQ checkpoint",
    "finetune": "train GPTQ-LoRA adapters (no arguments: the built-in CPU demo)",
    "merge": "merge a run's adapter into its base (fp16, GPTQ, or exact)",
    "export": "export a run for a serving engine (vLLM)",
    "chat": "chat with a run's model in the terminal",
    "generate": "generate responses for a file of prompts (JSON lines out)",
    "eval": "perplexity, task accuracy and lm-eval tasks of a run, a checkpoint or a model (JSON out)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the options of `command` (declared by the command); None: the command list only."""
    parser = argparse.ArgumentParser(prog="gptqlora", description="Fine-tune GPTQ-quantized LLMs with LoRA.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gptqlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(f"gptqlora.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=mod.DESCRIPTION, parents=[verbose],
                           epilog=getattr(mod, "EPILOG", None), formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


# Errors that are the user's input, not our bug: one clear line, exit status 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from gptqlora.adapters.model import AdapterError
    from gptqlora.checkpoint.config import QuantConfigError
    from gptqlora.checkpoint.io import CheckpointError
    from gptqlora.commands.export import ExportError
    from gptqlora.data.calibration import CalibrationError
    from gptqlora.data.records import DataError
    from gptqlora.eval import EvalError
    from gptqlora.formats.base import FormatError
    from gptqlora.inference import InferenceError
    from gptqlora.run import RunError
    from gptqlora.train.trainer import NonFiniteLossError

    return (FormatError, CalibrationError, QuantConfigError, CheckpointError, FileExistsError, FileNotFoundError,
            AdapterError, ExportError, RunError, NonFiniteLossError, InferenceError, DataError, EvalError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
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
