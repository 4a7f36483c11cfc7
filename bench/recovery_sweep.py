#!/usr/bin/env python
"""GPTQ-LoRA recovery on the man-page model: the protocol study behind the LoRA rows of bench/findings.py.

Hyperparameters are chosen on a validation split carved from the *end* of train.txt (its last --val-frac of
tokens, never trained on); the fine-tuning windows come from the rest of train.txt; test.txt (the held-out
score of docs/results.md) is scored only at the end of a run, never used to choose.

`--val-from heldout` validates on val_heldout.txt instead: held-out classic section-1 pages that test.txt
does not reach (`scripts/train_text_llama.py --write-val-heldout`), pages like test.txt's, where the
train.txt tail is mostly gcloud pages like the fine-tuning text. The fine-tuning windows are unchanged (the
same first 1 - --val-frac of train.txt), so a run differs from its train-tail twin only in what is measured
as validation; the row also records the train-tail NLL (`tail_val_nll`).

    PYTHONPATH=$PWD python bench/recovery_sweep.py --base /tmp/q2 --lr 1e-3,3e-4,1e-4 --out sweep.jsonl
    PYTHONPATH=$PWD python bench/recovery_sweep.py --base fp --lr 1e-4 --out sweep.jsonl   # fp16 reference

--base is `fp` (LoRA on the fp model: the continued-training reference) or a quantized checkpoint folder
(`gptqlora quantize ... --calibration bench/assets/manpage-llama/train.txt --seqlen 256 --nsamples 64`).
Each run appends one JSON line: settings, the per-step training loss, the training loss of the *untrained*
model on the same batches (so a rising curve can be told from harder late batches), validation NLL every
--eval-every steps, and the final validation and test NLL.

`--windows-from generated` keeps the token budget but trains on text *sampled from the fp teacher* (data-free
distillation, as in LLM-QAT, Liu et al. 2023): each window is the first --gen-prefix tokens of the train
window it replaces, continued by the teacher at temperature 1. The question it tests: does distilling on the
teacher's own distribution transfer to held-out pages better than distilling on train.txt?

`--model DIR` runs the protocol on another man-page model folder (default bench/assets/manpage-llama; e.g.
bench/assets/manpage-llama-v2, built with `scripts/train_text_llama.py --split content`): its train.txt,
test.txt and val_heldout.txt, and its weights as the fp base and teacher. Each row records it (`model`).

`--extra-test FILE` also scores FILE's text at the end of a run, as test.txt is scored (non-overlapping
windows of the spec's seqlen), into the row's `extra_test_nll` (`extra_test`: the path); e.g. test_nocopy.txt,
test.txt without its pages that are copies of training pages (`scripts/train_text_llama.py --write-test-nocopy`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).parent))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from quality_models import MANPAGE_DIR, VAL_FRAC, manpage_spec, train_text_split  # noqa: E402

VAL_HELDOUT = "val_heldout.txt"  # in the model folder: --val-from heldout


def windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def sample(model, prefix: torch.Tensor, seqlen: int, g: torch.Generator) -> torch.Tensor:
    """Continue each row of `prefix` to `seqlen` tokens by multinomial sampling at temperature 1 (KV cache)."""
    seq, past, nxt = [prefix], None, prefix
    for _ in range(seqlen - prefix.shape[1]):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1, generator=g)
        seq.append(nxt)
    return torch.cat(seq, 1)


def generated(teacher, x: torch.Tensor, prefix: int, seed: int, model_dir: Path, eos: int, batch: int = 64,
              cache_dir: Path = Path("/tmp/gptqlora-gen")) -> torch.Tensor:
    """x's windows with all but their first `prefix` tokens resampled from the teacher (prefix 0: each starts
    from EOS, the page separator the model was trained with; it never saw BOS). Cached under /tmp."""
    key = hashlib.sha256((model_dir / "model.safetensors").read_bytes() + x[:, :prefix].numpy().tobytes()
                         + f"{x.shape} {prefix} {seed}".encode()).hexdigest()[:16]
    cache = cache_dir / f"gen-{x.shape[0]}x{x.shape[1]}-p{prefix}-s{seed}-{key}.safetensors"
    if cache.is_file():
        return load_file(cache)["ids"]
    g = torch.Generator().manual_seed(seed)
    starts = x[:, :prefix] if prefix else torch.full((x.shape[0], 1), eos)
    out = torch.cat([sample(teacher, starts[i:i + batch], x.shape[1], g) for i in range(0, len(x), batch)])
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"ids": out.contiguous()}, cache)
    return out


@torch.no_grad()
def nll(model, ids: torch.Tensor, seqlen: int, batch: int = 16) -> float:
    """Mean next-token NLL over non-overlapping windows of `seqlen` (the GPTQ protocol)."""
    from gptqlora.eval.perplexity import perplexity

    was = model.training
    model.eval()
    r = perplexity(model, ids, seqlen, batch_size=batch)
    model.train(was)
    return r["nll"]


def schedule(kind: str, steps: int, warmup: int):
    def f(s: int) -> float:
        w = min(1.0, (s + 1) / warmup) if warmup else 1.0
        if kind == "constant":
            return w
        return w * 0.5 * (1 + math.cos(math.pi * s / steps))
    return f


def train(model, x: torch.Tensor, steps: int, batch: int, lr: float, sched: str, warmup: int,
          teacher=None, eval_fn=None, eval_every: int = 0, clip: float | None = None) -> dict:
    """AdamW on the trainable parameters; x holds steps*batch windows in training order."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(sched, steps, warmup))
    losses, curve = [], []
    model.train()
    for s in range(steps):
        xb = x[s * batch:(s + 1) * batch]
        out = model(input_ids=xb, labels=xb)
        loss = out.loss
        if teacher is not None:  # distillation: KL(teacher || student) on every position
            with torch.no_grad():
                t = torch.log_softmax(teacher(input_ids=xb).logits.float(), -1)
            loss = torch.nn.functional.kl_div(torch.log_softmax(out.logits.float(), -1), t, log_target=True,
                                              reduction="batchmean") / xb.shape[1]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if eval_fn and eval_every and (s + 1) % eval_every == 0 and s + 1 < steps:
            curve.append((s + 1, eval_fn(model)))
    model.eval()
    return {"losses": losses, "val_curve": curve}


@torch.no_grad()
def batch_losses(model, x: torch.Tensor, batch: int) -> list[float]:
    model.eval()
    return [model(input_ids=x[i:i + batch], labels=x[i:i + batch]).loss.item() for i in range(0, len(x), batch)]


def build(base: str, spec, args, init: str):
    from transformers import AutoModelForCausalLM

    from gptqlora.adapters import GPTQLoraConfig, get_peft_model
    from gptqlora.adapters.config import FP_INITS
    from gptqlora.checkpoint.checkpoint import load_quantized

    m = (AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32) if base == "fp"
         else load_quantized(base, device="cpu", dtype=torch.float32))
    if args.rank == 0:
        return m
    cfg = GPTQLoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha else 2 * args.rank, lora_dropout=0.0,
                         init_method=init, svd_source=str(spec.model_dir) if init in FP_INITS else None,
                         use_qalora=args.qalora, qalora_group_size=args.qalora_group, svd_iters=args.svd_iters)
    return get_peft_model(m, cfg, calibration=spec.calibration)


def _init(r: dict) -> str:
    if not r["rank"]:
        return "untrained"
    return r["init"] + (f" x{r['svd_iters']}" if r.get("svd_iters", 1) > 1 else "")


def _val_from(r: dict) -> str:
    return r.get("val_from", "train-tail")  # rows from before --val-from


def table(path: str) -> str:
    """Markdown of a sweep's JSON lines: gap closed on validation and test against the untrained 2-bit
    row (rank 0) and the untrained fp row of the same file with the same validation text (--val-from) and
    model folder (--model)."""
    rows = [json.loads(line) for p in path.split(",") for line in Path(p).read_text().splitlines() if line.strip()]
    out = ["| base | loss | init | rank | lr | val | val NLL | val gap closed | test NLL | test gap closed | "
           "train loss, last 10 batches (untrained) |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("windows_from", "train") == "all":  # trained on the validation tail
            continue
        same = [b for b in rows if b["rank"] == 0 and _val_from(b) == _val_from(r) and b.get("model") == r.get("model")]
        fp = next((b for b in same if b["base"] == "fp"), None)
        q = next((b for b in same if b["base"] == r["base"]), None)
        closed = {k: (f"{1 - (r[k] - fp[k]) / (q[k] - fp[k]):.1%}"
                      if r["base"] != "fp" and fp and q and r["rank"] and None not in (r[k], q[k], fp[k]) else "")
                  for k in ("val_nll", "test_nll")}  # a --no-test row has no test NLL
        test = "" if r["test_nll"] is None else f"{r['test_nll']:.4f}"
        loss = ("kd" if r["distill"] else "ce") + (", gen" if r.get("windows_from") == "generated" else "")
        out.append(f"| {'fp16' if r['base'] == 'fp' else Path(r['base']).name} | {loss} | {_init(r)} | "
                   f"{r['rank'] or ''} | "
                   f"{r['lr'] if r['rank'] else ''} | {_val_from(r)} | {r['val_nll']:.4f} | {closed['val_nll']} | "
                   f"{test} | {closed['test_nll']} | {r['loss_last10']:.3f} ({r['untrained_last10']:.3f}) |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="fp, or a quantized checkpoint folder")
    p.add_argument("--model", default=str(MANPAGE_DIR),
                   help="the man-page model folder (fp base, teacher, train.txt, test.txt, val_heldout.txt)")
    p.add_argument("--table", help="print the markdown table of these JSON-lines files (comma-separated) and exit")
    p.add_argument("--init", default="default", help="comma list: default, svd, aware, output")
    p.add_argument("--lr", default="1e-3", help="comma list")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=0, help="LoRA alpha (0: 2 x rank)")
    p.add_argument("--qalora", action="store_true")
    p.add_argument("--svd-iters", type=int, default=1, help="--init svd: alternations (>1 re-rounds the base codes)")
    p.add_argument("--qalora-group", type=int, default=64)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    p.add_argument("--clip", type=float, default=None, help="gradient-norm clipping")
    p.add_argument("--distill", action="store_true", help="loss: KL to the fp model's next-token distribution")
    p.add_argument("--val-frac", type=float, default=VAL_FRAC,
                   help="the end of train.txt kept out of the fine-tuning windows (the validation text by default)")
    p.add_argument("--val-from", default="train-tail", choices=("train-tail", "heldout"),
                   help="validation text: the last --val-frac of train.txt (default), or the model folder's "
                        f"{VAL_HELDOUT} (held-out classic pages past test.txt's cut); the fine-tuning windows "
                        "are the same either way")
    p.add_argument("--windows-from", default="train", choices=("train", "all", "generated"),
                   help="draw the fine-tuning windows from the training part (default), from all of train.txt, "
                        "validation tail included (what bench/findings.py did before the split), or sample them "
                        "from the fp teacher, started from training-part prefixes (data-free distillation)")
    p.add_argument("--gen-prefix", type=int, default=16,
                   help="--windows-from generated: tokens of real text each sample starts from (0: EOS only)")
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--no-test", action="store_true", help="skip the test.txt score")
    p.add_argument("--extra-test", metavar="FILE",
                   help="also score this text at the end, as test.txt (row keys extra_test, extra_test_nll)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--out", help="JSON lines, appended (required unless --table)")
    args = p.parse_args(argv)
    if args.table:
        sys.stdout.write(table(args.table))
        return 0
    if not args.base or not args.out:
        p.error("--base and --out are required (or --table)")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptqlora.eval.perplexity import perplexity, text_ids

    spec = manpage_spec(64, model_dir=Path(args.model))
    tok = AutoTokenizer.from_pretrained(spec.model_dir)
    train_ids, tail_ids = train_text_split(spec, tok, args.val_frac)
    val_ids = tail_ids if args.val_from == "train-tail" else text_ids(tok, (spec.model_dir / VAL_HELDOUT).read_text())
    extra_ids = text_ids(tok, Path(args.extra_test).read_text()) if args.extra_test else None
    x = windows(torch.cat([train_ids, tail_ids]) if args.windows_from == "all" else train_ids,
                args.steps * args.batch, spec.seqlen, args.seed)
    teacher = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32).eval() \
        if args.distill or args.windows_from == "generated" else None
    t_gen = time.time()
    if args.windows_from == "generated":  # same windows' prefixes, the rest sampled from the teacher
        x = generated(teacher, x, args.gen_prefix, args.seed, Path(spec.model_dir), tok.eos_token_id)
    t_gen = round(time.time() - t_gen, 1)  # 0 when read from the cache
    if not args.distill:
        teacher = None
    for init in args.init.split(","):
        for lr in (float(v) for v in args.lr.split(",")):
            torch.manual_seed(args.seed)
            t0 = time.time()
            model = build(args.base, spec, args, init)
            val0 = nll(model, val_ids, spec.seqlen)
            ref = batch_losses(model, x, args.batch)  # the untrained model on the same batches
            r = train(model, x, args.steps, args.batch, lr, args.schedule, args.warmup, teacher,
                      lambda m: nll(m, val_ids, spec.seqlen), args.eval_every, args.clip) if args.rank else \
                {"losses": ref, "val_curve": []}
            row = {"tag": args.tag, "model": args.model, "base": args.base, "init": init, "lr": lr,
                   "rank": args.rank, "svd_iters": args.svd_iters,
                   "alpha": args.alpha or 2 * args.rank, "qalora": args.qalora, "steps": args.steps,
                   "batch": args.batch, "warmup": args.warmup, "schedule": args.schedule, "clip": args.clip,
                   "distill": args.distill, "windows_from": args.windows_from,
                   "gen_prefix": args.gen_prefix if args.windows_from == "generated" else None, "gen_seconds": t_gen,
                   "seed": args.seed, "val_from": args.val_from, "val_tokens": int(val_ids.numel()),
                   "train_tokens": int(train_ids.numel()), "val_nll_init": val0, "val_curve": r["val_curve"],
                   "val_nll": nll(model, val_ids, spec.seqlen),
                   "tail_val_nll": nll(model, tail_ids, spec.seqlen) if args.val_from != "train-tail" else None,
                   "test_nll": None if args.no_test else spec.score(model)["nll"],
                   "extra_test": args.extra_test,  # scored as test.txt is (spec.score)
                   "extra_test_nll": perplexity(model, extra_ids, spec.seqlen, batch_size=8)["nll"]
                   if args.extra_test else None,
                   "loss_first": r["losses"][0], "untrained_first": ref[0],
                   "loss_first10": sum(r["losses"][:10]) / 10, "loss_last10": sum(r["losses"][-10:]) / 10,
                   "untrained_first10": sum(ref[:10]) / 10, "untrained_last10": sum(ref[-10:]) / 10,
                   "losses": [round(v, 4) for v in r["losses"]], "seconds": round(time.time() - t0, 1)}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
