"""The `gptqlora` command: finds the subcommand, lets it declare its options, parses, then calls it.

Each command lives in `gptqlora.commands.<name>` with `DESCRIPTION`, `add_arguments(parser)` and
`run(args) -> exit status`; only the command being run is imported. No work happens here.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import logging
import os
import re
import sys
import warnings

from gptqlora import __version__

EPILOG = """Typical flow:
  gptqlora analyze MODEL_DIR --calibration data.jsonl --out analysis/      (optional: where it hurts)
  gptqlora quantize MODEL_DIR OUT_DIR --bits 2 --group-size 64 --calibration data.jsonl
  gptqlora finetune --quant_checkpoint OUT_DIR --data alpaca.json --output_dir runs/my-run
  gptqlora merge runs/my-run --to fp16 --out merged/
  gptqlora chat runs/my-run
Run `gptqlora COMMAND --help` for each command's options (written --snake_case or --kebab-case, as you
like). `gptqlora finetune` with no arguments runs the built-in demo: a tiny bundled model, quantized to
2 bit and fine-tuned on bundled data, on a CPU."""

# In the order of the workflow: name -> one line for `gptqlora --help`.
COMMANDS = {
    "analyze": "quantization sensitivity and activation outliers of an fp16 model (JSON + plots)",
    "quantize": "quantize an fp16/bf16 model to a GPTQ checkpoint (or SpQR; per-module precision)",
    "finetune": "train GPTQ-LoRA adapters (no arguments: the built-in CPU demo)",
    "merge": "merge a run's adapter into its base (fp16, GPTQ, or exact)",
    "export": "export a run for a serving engine (vLLM)",
    "chat": "chat with a run's model in the terminal",
    "generate": "generate responses for a file of prompts (JSON lines out)",
    "eval": "perplexity, task accuracy and lm-eval tasks of a run, a checkpoint or a model (JSON out)",
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): what is wrong, and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# Local inputs checked before a command's modules (torch, transformers) are imported, so that a missing
# path fails at once: command -> (what its first positional argument is, {option: kind}). The command
# checks every input again, fully; this only makes the common mistake fast.
PREFLIGHT = {
    "quantize": ("MODEL_DIR", "model folder", {"--calibration": "calibration file"}),
    "finetune": (None, None, {"--quant_checkpoint": "model folder", "--base_model": "model folder",
                              "--config": "file", "--data": "data file", "--data_path": "data file",
                              "--calibration": "calibration file"}),
    "merge": ("RUN_DIR", "run folder", {"--calibration": "calibration file"}),
    "export": ("RUN_DIR", "run folder", {}),
    "chat": ("RUN_DIR", "run folder", {"--base": "checkpoint folder"}),
    "generate": ("RUN_DIR", "run folder", {"--base": "checkpoint folder", "--prompts": "prompts file"}),
}


def _preflight(command: str, argv: list[str]) -> None:
    """Raise PathError for an input path given on the command line that does not exist."""
    from gptqlora.paths import require_dir, require_file

    name, what, options = PREFLIGHT[command]
    rest = argv[argv.index(command) + 1:]
    if name and rest and not rest[0].startswith("-"):  # `gptqlora merge RUN ...`: unambiguous
        require_dir(rest[0], name, what)
    spellings = {s: opt for opt in options for s in (opt, opt.replace("_", "-"))}
    for i, token in enumerate(rest):
        flag, eq, value = token.partition("=")
        if flag not in spellings:
            continue
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("-"):
                continue  # argparse reports the missing value
            value = rest[i + 1]
        opt = spellings[flag]
        kind = options[opt]
        values = [value]
        if kind == "data file":  # a comma-separated list, or a Python literal such as "['a.json','b.json']"
            if value.strip().startswith("["):
                try:
                    values = [str(v) for v in ast.literal_eval(value.strip())]
                except (ValueError, SyntaxError):
                    continue  # argparse reports it
            else:
                values = [v.strip() for v in value.split(",") if v.strip()]
        for v in values:
            if v == "-" and kind == "prompts file":
                continue
            (require_dir if kind.endswith("folder") else require_file)(v, opt, kind)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the options of `command` (declared by the command); None: the command list only."""
    parser = Parser(prog="gptqlora", description="Fine-tune GPTQ-quantized LLMs with LoRA.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gptqlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbose = Parser(add_help=False)
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
        parser.set_defaults(command_parser=p)
    return parser


# Errors that are the user's input, not our bug: one clear line, exit status 2, no traceback. By module, so
# that none is imported just to catch its error (only a module already imported can have raised one).
USER_ERRORS = {
    "gptqlora.formats.base": "FormatError", "gptqlora.data.calibration": "CalibrationError",
    "gptqlora.checkpoint.config": "QuantConfigError", "gptqlora.checkpoint.io": "CheckpointError",
    "gptqlora.adapters.model": "AdapterError", "gptqlora.commands.export": "ExportError",
    "gptqlora.run": "RunError", "gptqlora.train.trainer": "NonFiniteLossError",
    "gptqlora.inference": "InferenceError", "gptqlora.data.records": "DataError",
    "gptqlora.data.templates": "TemplateError", "gptqlora.paths": "PathError",
    "gptqlora.commands.args": "OptionError", "gptqlora.devices": "DeviceError", "gptqlora.eval": "EvalError",
}


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, (FileExistsError, FileNotFoundError)):
        return True
    classes = [getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules]
    return isinstance(e, tuple(classes))


def _interrupted(e: BaseException) -> bool:
    """Ctrl-C, also when a library re-raised it as another error (an import cut short by Ctrl-C surfaces
    as ModuleNotFoundError/RuntimeError from transformers' lazy modules)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt) or "KeyboardInterrupt" in str(e).split(":", 1)[-1][:200]:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _did_you_mean(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """'; did you mean --num_epochs?' for unknown options close to one of `parser`'s, else ''."""
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    hints = [(near[0], flag) for flag in (e.split("=")[0] for e in extra if e.startswith("--"))
             if (near := difflib.get_close_matches(flag, known, n=1, cutoff=0.75))]
    if len(hints) == 1:
        return f" (did you mean {hints[0][0]}?)"
    return f" (did you mean {', '.join(f'{a} for {b}' for a, b in hints)}?)" if hints else ""


def _one_line(e: BaseException) -> str:
    """A user error's message on one line (a list of problems is joined with '; ')."""
    lines = [re.sub(r"^\s*- ", "", x).strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local-first: the Hub only when the user asks (=0)
    # logging before any library import, so that import-time noise goes through it
    logging.basicConfig(level=logging.DEBUG if {"-v", "--verbose"} & set(argv) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # bitsandbytes warns at import that it cannot fetch a CPU kernel from the Hub: not our users' concern
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # ... nor that the `kernels` package (which bitsandbytes asks for one) skips a Hub publisher check offline
    logging.getLogger("kernels").setLevel(logging.ERROR)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # analyze's plots: its INFO lines are about axes
    # transformers deprecation noise raised from inside PEFT, not actionable by our users
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        dry = any(a.split("=")[0] in ("--dry_run", "--dry-run") and not a.lower().endswith(("=false", "=0", "=no"))
                  for a in argv)  # resolves the arguments only; the paths may be for another machine
        if command in PREFLIGHT and not {"-h", "--help"} & set(argv) and not dry:
            _preflight(command, argv)
        parser = build_parser(command if command in COMMANDS else None)
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:  # reported by the command's parser, naming the command and its --help
                sub = getattr(args, "command_parser", parser)
                sub.error(f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(sub, extra)}")
        except SystemExit as e:  # --help, --version, or a one-line parse error (status 2)
            return e.code if isinstance(e.code, int) else 0
        if args.command is None:
            parser.print_help()
            return 0
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:
        if _is_user_error(e):
            sys.stderr.write(f"gptqlora {command}: error: {_one_line(e)}\n")
            return 2
        if _interrupted(e):
            sys.stderr.write("interrupted\n")
            return 130
        sys.stderr.write(f"gptqlora {command}: internal error (a bug in gptqlora, not in your input); please "
                         f"report it with the traceback below\n")
        raise


if __name__ == "__main__":
    raise SystemExit(main())
