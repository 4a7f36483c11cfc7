"""`gptqlora generate`: batched generation for a file of prompts, one JSON line per prompt (and adapter).

Loading, prompt rendering and generation are `gptqlora.inference`; this module reads prompt files and
writes the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from gptqlora.commands.args import add_option, ranged
from gptqlora.commands.model_options import add_model_options, sampling as sampling_from, set_seed

if TYPE_CHECKING:  # inference (torch, transformers) loads where the command runs: `--help` needs none of it
    from gptqlora.inference import Loaded, PromptFormat, Sampling

logger = logging.getLogger(__name__)

DESCRIPTION = ("Batched generation: one JSON line {\"prompt\", \"response\", \"adapter\"} per prompt (per adapter "
               "with --use a,b), in input order, on stdout.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_option(p, "prompts", required=True,
               help="one prompt per line, or .jsonl with a \"prompt\" field (other fields are copied to the "
                    "output); - reads stdin")
    add_option(p, "format", dest="file_format", choices=("auto", "text", "jsonl"), default="auto",
               help="prompts file format (default: jsonl for *.jsonl, else text)")
    add_option(p, "use", default=None, metavar="NAME[,NAME...]",
               help="adapters to generate with, comma-separated; off = the base model (default: the first)")
    add_option(p, "raw", action="store_true", help="give prompts to the model as is, without a template")
    add_option(p, "batch_size", type=ranged(int, "batch_size", min=1), default=8,
               help="prompts per batch (default 8). On a GPU, batches of 2+ decode 2/4-bit GPTQ layers through the "
                    "tensor-core kernel (GPTQLORA_GEMV_MMA=0 keeps the Triton kernels; README 'chat and generate: decoding')")


def run(args: argparse.Namespace) -> int:
    use = [u.strip() for u in args.use.split(",") if u.strip()] if args.use else []
    return run_generate(args.prompts, args.run_dir, args.base, args.adapters, use, args.template, args.chat_template,
                        args.raw, args.system, sampling_from(args), args.batch_size, args.max_context,
                        args.file_format, args.device, args.seed)


# -- prompt files ---------------------------------------------------------------------------------------


def read_prompts(path: str, fmt: str = "auto", stdin: TextIO | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(location, item) per prompt; an item is {"prompt": str, ...other fields kept}.

    Text: one prompt per line (blank lines skipped). JSON Lines (``.jsonl``, or ``fmt="jsonl"``): objects
    with a "prompt" string, an optional "input" string (template context) and any other fields.
    ``-`` reads standard input.
    """
    from gptqlora.inference import InferenceError

    name = "<stdin>" if path == "-" else path
    if path == "-":
        text = (stdin or sys.stdin).read()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InferenceError(f"{path}: prompts file not found") from None
        except UnicodeDecodeError as e:
            raise InferenceError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    jsonl = fmt == "jsonl" or (fmt == "auto" and name.endswith(".jsonl"))
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        if not jsonl:
            items.append((where, {"prompt": line}))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceError(f"{where}: invalid JSON ({e.msg}, column {e.colno}); each line must be one "
                                 f'object like {{"prompt": "..."}}') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise InferenceError(f'{where}: needs a "prompt" string field, e.g. {{"prompt": "..."}}')
        if not isinstance(obj.get("input", ""), str):
            raise InferenceError(f'{where}: "input" must be a string')
        items.append((where, obj))
    if not items:
        raise InferenceError(f"{name}: no prompts (the input is empty); give one prompt per line"
                             + (' or one {"prompt": ...} object per line' if jsonl else ""))
    return items


def generate_file(loaded: Loaded, fmt: PromptFormat, prompts_path: str, out: TextIO, sampling: Sampling,
                  file_format: str = "auto", stdin: TextIO | None = None, **kw: Any) -> int:
    """`generate_items` on the prompts of a file (see `read_prompts`)."""
    return generate_items(loaded, fmt, read_prompts(prompts_path, file_format, stdin), out, sampling, **kw)


def generate_items(loaded: Loaded, fmt: PromptFormat, items: Sequence[tuple[str, dict[str, Any]]], out: TextIO,
                   sampling: Sampling, use: Sequence[str | None] | None = None, batch_size: int = 8,
                   max_context: int | None = None) -> int:
    """Write {"prompt", "response", "adapter", ...} JSON lines for each prompt (and each adapter in ``use``).

    Prompts are done in chunks so output appears as it goes; within a chunk all adapters run, and lines
    come out in input order (per prompt: one line per adapter). Returns the number of lines written.
    """
    from gptqlora.inference import OFF, InferenceError, generate_responses, using_adapter

    if batch_size < 1:
        raise InferenceError(f"--batch-size must be at least 1, got {batch_size}")
    use = list(use) if use else [loaded.adapters[0] if loaded.adapters else OFF]
    for name in use:
        if name not in (None, OFF) and name not in loaded.adapters:
            raise InferenceError(f"no adapter {name!r}; loaded: {', '.join(loaded.adapters) or 'none'} "
                                 f"(or {OFF!r} for the base model)")
    limit = loaded.context_size(max_context, sampling) - sampling.max_new_tokens
    encoded = []
    for where, item in items:  # all checked before any generation
        ids = fmt.encode([], item["prompt"], loaded.tokenizer, item.get("input"))
        if len(ids) > limit:
            raise InferenceError(f"{where}: the prompt is {len(ids)} tokens; with --max-new-tokens "
                                 f"{sampling.max_new_tokens} at most {limit} fit the context; shorten it")
        encoded.append(ids)
    written = 0
    chunk = batch_size * 4
    for start in range(0, len(items), chunk):
        ids = encoded[start : start + chunk]
        results = {}
        for name in use:
            with using_adapter(loaded.model, name):
                results[name] = generate_responses(loaded.model, loaded.tokenizer, ids, sampling, batch_size)
        for k, (_, item) in enumerate(items[start : start + chunk]):
            for name in use:
                text = results[name][k]
                row = {**item, "response": text if fmt.mode == "raw" else text.strip(),
                       "adapter": None if name in (None, OFF) else name}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
        out.flush()
    logger.info("wrote %d response%s", written, "" if written == 1 else "s")
    return written


def run_generate(prompts: str, run_dir: str | None = None, base: str | None = None,
                 adapters: Sequence[str] = (), use: Sequence[str] = (), template: str | None = None,
                 chat_template: bool = False, raw: bool = False, system: str | None = None,
                 sampling: Sampling | None = None, batch_size: int = 8, max_context: int | None = None,
                 file_format: str = "auto", device: str | None = None, seed: int | None = None,
                 out: TextIO | None = None) -> int:
    """What `gptqlora generate` does; returns the exit status."""
    from gptqlora.inference import Sampling, compiled_decode, load_model

    sampling = sampling or Sampling()
    items = read_prompts(prompts, file_format)  # a bad prompts file fails before the model loads
    loaded = load_model(run_dir, base, adapters, device, template)
    fmt = loaded.prompt_format(chat_template, system, raw)
    compiled_decode(loaded.model, sampling)  # --decode compiled needs CUDA: fail before any generation
    set_seed(seed)
    generate_items(loaded, fmt, items, out or sys.stdout, sampling, use or None, batch_size, max_context)
    return 0
