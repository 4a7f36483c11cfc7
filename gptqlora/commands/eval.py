"""`gptqlora eval PATH`: perplexity, the synthetic task suite and lm-eval tasks on a run, a GPTQ checkpoint or an
fp16 model, with or without an adapter; JSON out.

Every input is checked before the model is loaded: the files exist and hold text, the window fits the
model's context, lm-eval is installed and knows each task name.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptqlora.commands.args import add_option, ranged
from gptqlora.data.templates import DEFAULT_TEMPLATE
from gptqlora.eval import EvalError

log = logging.getLogger(__name__)

DESCRIPTION = ("Evaluate a model: perplexity on a local text file (GPTQ protocol: the text tokenized once, cut "
               "into non-overlapping windows of --seqlen tokens), accuracy on the built-in synthetic task suite "
               "(exact match of the final answer; chain-of-thought answers read after the rationale), and "
               "lm-evaluation-harness tasks. PATH is a run folder (its base + adapter), a GPTQ checkpoint or an "
               "fp16/bf16 model.")
EPILOG = """examples:
  gptqlora eval runs/my-run --perplexity test.txt --seqlen 2048 --out eval.json
  gptqlora eval models/llama-7b-2bit --perplexity wiki.test.txt --adapter runs/my-run/adapter
  gptqlora eval runs/my-run --tasks synthetic --no-adapter         # the quantized base alone
  gptqlora eval runs/my-run --tasks arc_easy,gsm8k --limit 200     # needs: pip install 'gptqlora[lmeval]'
--perplexity also takes .json/.jsonl training records (alpaca, cot, chat): then it scores only their
response tokens, what fine-tuning learns."""
SYNTHETIC = "synthetic"
RECORD_SUFFIXES = (".json", ".jsonl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run folder, a GPTQ checkpoint, or an fp16/bf16 model directory")
    add_option(p, "perplexity", metavar="FILE",
               help="text file for perplexity (.txt; .json/.jsonl records: response tokens only)")
    add_option(p, "seqlen", type=int, default=None,
               help="tokens per perplexity window (default: 2048, or the model's context if shorter)")
    add_option(p, "max_windows", type=ranged(int, "max_windows", min=1), default=None,
               help="score at most this many windows")
    add_option(p, "tasks", default=None, metavar="synthetic|TASK[,TASK...]",
               help="'synthetic' (the built-in suite) and/or lm-eval task names, comma-separated")
    add_option(p, "limit", type=ranged(int, "limit", min=1), default=None,
               help="records per task (synthetic: per eval file, default all 200; lm-eval: its --limit)")
    add_option(p, "num_fewshot", type=ranged(int, "num_fewshot", min=0), default=None, help="lm-eval few-shot examples (default: the task's)")
    add_option(p, "adapter", default=None, help="a PEFT LoRA adapter to load on top of PATH")
    add_option(p, "no_adapter", action="store_true", help="with a run folder: evaluate its base without the adapter")
    add_option(p, "template", default=None, help="prompt template for records (default: the run's, else alpaca)")
    add_option(p, "batch_size", type=ranged(int, "batch_size", min=1), default=8, help="windows / prompts per batch (default 8)")
    add_option(p, "device", default=None, help="device (default: cuda if available, else cpu)")
    add_option(p, "out", default=None, help="write the JSON here (default: print it)")


@dataclass
class Plan:
    """What to evaluate, checked before the model loads."""

    perplexity: Path | None
    synthetic: bool
    harness: list[str]


def plan(args: argparse.Namespace) -> Plan:
    """Check the inputs that need no model: files, task names, lm-eval being there; one line on failure."""
    path = Path(args.path)
    if not (path / "config.json").is_file() and not (path / "run.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json or run.json; give a run folder, a GPTQ checkpoint or a "
                                f"model directory")
    text = None
    if args.perplexity:
        text = Path(args.perplexity)
        if not text.is_file():
            raise FileNotFoundError(f"--perplexity {text}: no such file")
        if text.stat().st_size == 0 or not text.read_text(errors="replace").strip():
            raise EvalError(f"--perplexity {text}: the file is empty; give a text to score")
    if args.seqlen is not None and args.seqlen < 2:
        raise EvalError(f"--seqlen {args.seqlen}: a window needs at least 2 tokens")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    harness = [t for t in tasks if t != SYNTHETIC]
    near = difflib.get_close_matches(SYNTHETIC, harness, n=1, cutoff=0.75)
    if near:  # a typo of the built-in suite, not an lm-eval task (whose check would first ask to install lm-eval)
        raise EvalError(f"--tasks {near[0]}: no such task; did you mean {SYNTHETIC!r} (the built-in suite)?")
    if harness:
        from gptqlora.eval.harness import check_tasks

        check_tasks(harness)
    if text is None and not tasks:
        raise EvalError("nothing to evaluate: pass --perplexity FILE and/or --tasks synthetic|TASK,...")
    if args.no_adapter and args.adapter:
        raise EvalError("--adapter and --no-adapter contradict each other; pick one")
    return Plan(text, SYNTHETIC in tasks, harness)


def load(args: argparse.Namespace) -> tuple[Any, Any, Any, dict]:
    """(model, tokenizer, template, what was loaded) for PATH, a run, a checkpoint or an fp model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptqlora.adapters.model import load_adapter
    from gptqlora.checkpoint.checkpoint import load_quantized
    from gptqlora.checkpoint.config import read_quant_config
    from gptqlora.data.templates import PromptTemplate
    from gptqlora.devices import default_dtype, resolve_device
    from gptqlora.run import Run

    path, device = Path(args.path), resolve_device(args.device)
    dtype = default_dtype(device)
    info: dict[str, Any] = {"path": str(path)}
    template = PromptTemplate.load(args.template) if args.template else None
    if Run.is_run(path):
        run = Run.open(path)
        tokenizer, template = run.tokenizer(), template or run.template()
        if args.no_adapter:
            model, info["adapter"] = load_quantized(run.base_dir(), device=device, dtype=dtype), None
        else:
            model, info["adapter"] = run.load(device=device, dtype=dtype), str(run.adapter())
        info["kind"] = "run"
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if read_quant_config(path) is not None:
            model, info["kind"] = load_quantized(path, device=device, dtype=dtype), "gptq"
        else:
            if not any(path.glob("*.safetensors")):
                raise FileNotFoundError(f"{path}: no *.safetensors weights (gptqlora never loads pickled "
                                        f"weights); convert them to safetensors")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
            info["kind"] = "fp"
    if args.adapter:
        model, info["adapter"] = load_adapter(model, args.adapter), str(args.adapter)
    info.setdefault("adapter", None)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, template or PromptTemplate.load(DEFAULT_TEMPLATE), info


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation's JSON record, computed without autograd (the caller's grad mode is left as it was)."""
    import torch

    with torch.no_grad():
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from gptqlora.eval.perplexity import max_context

    p = plan(args)
    model, tokenizer, template, info = load(args)
    result: dict[str, Any] = {"model": info}
    if p.perplexity is not None:
        context = max_context(model)
        seqlen = args.seqlen or min(2048, context or 2048)
        result.update(_perplexity(model, tokenizer, template, p.perplexity, seqlen, args))
    tasks: dict[str, Any] = {}
    if p.synthetic:
        tasks[SYNTHETIC] = _synthetic(model, tokenizer, template, args)
    if p.harness:
        from gptqlora.eval.harness import lm_eval_tasks

        tasks.update(lm_eval_tasks(model, tokenizer, p.harness, args.limit, args.batch_size, args.num_fewshot))
    if tasks:
        result["tasks"] = tasks
    return result


def _perplexity(model, tokenizer, template, path: Path, seqlen: int, args) -> dict[str, Any]:
    from gptqlora.eval.perplexity import check_windows, max_context, perplexity, response_perplexity, text_ids

    if path.suffix in RECORD_SUFFIXES:
        from gptqlora.data.dataset import build_datasets

        rows, _ = build_datasets([path], tokenizer, template, cutoff_len=seqlen)
        r = response_perplexity(model, [dict(x) for x in rows], args.batch_size, progress=True)
        return {"perplexity": r["perplexity"], "tokens": r["tokens"], "seqlen": seqlen, "records": r["records"],
                "nll": r["nll"], "file": str(path), "protocol": "response tokens of records"}
    ids = text_ids(tokenizer, path.read_text(errors="replace"))
    check_windows(int(ids.numel()), seqlen, max_context(model), where=f"--perplexity {path}")
    r = perplexity(model, ids, seqlen, args.batch_size, progress=True, max_windows=args.max_windows, where=str(path))
    return {"perplexity": r["perplexity"], "tokens": r["tokens"], "seqlen": seqlen, "windows": r["windows"],
            "nll": r["nll"], "file": str(path), "protocol": "gptq (non-overlapping windows)"}


def _synthetic(model, tokenizer, template, args) -> dict[str, Any]:
    from gptqlora.data.assets import eval_data_files
    from gptqlora.data.dataset import template_for_kind
    from gptqlora.data.records import detect_kind, read_records
    from gptqlora.eval.accuracy import task_accuracy

    records = []
    for f in eval_data_files():
        records += read_records(f).records[:args.limit] if args.limit else read_records(f).records
    res = task_accuracy(model, tokenizer, records, lambda r: template_for_kind(detect_kind(r), template),
                        max_new_tokens=48, batch_size=max(args.batch_size, 8), progress=True)
    return {k: v for k, v in res.items() if k != "responses"}


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        parts = []
        if "perplexity" in result:
            parts.append(f"perplexity {result['perplexity']:.3f} ({result['tokens']} tokens, seqlen "
                         f"{result['seqlen']})")
        for name, r in result.get("tasks", {}).items():
            if "accuracy" in r:
                parts.append(f"{name} accuracy {r['accuracy']:.1%}")
            else:
                parts.append(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()
                                                     if isinstance(v, float)))
        sys.stdout.write("; ".join(parts) + f"; wrote {args.out}\n")
    else:
        sys.stdout.write(text + "\n")
    return 0
