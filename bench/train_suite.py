"""Training-step benchmark: the peers and gptqlora in one run, one process per configuration.

    python bench/train_suite.py [--set core|core-lite|best|ab|ablations|compile|default|all] [--batches 16x256,1x2048] [--shape 7b] [--out DIR]

Peers: bf16 base + PEFT LoRA (the ceiling users compare with; also with Liger, to show what Liger alone
gives), bitsandbytes NF4 + PEFT (QLoRA). gptqlora at 2/3/4 bit with its defaults (Triton dequant, fused
base+LoRA, Liger). Ablations take one piece away at a time. Prints a markdown table with the ratios to
NF4 QLoRA and to bf16 LoRA of the same batch shape; writes every record to DIR/train_suite.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CORE = [["--mode", "bf16"], ["--mode", "bf16", "--liger"], ["--mode", "nf4"],
        ["--mode", "gptq", "--bits", "4", "--group", "128", "--liger"],
        ["--mode", "gptq", "--bits", "3", "--group", "128", "--liger"],
        ["--mode", "gptq", "--bits", "2", "--group", "64", "--liger"]]
# each tool at its best settings that fit the card: no recomputation (an H200 has the memory for a 7B)
BEST = [["--mode", "bf16", "--no-checkpointing"], ["--mode", "nf4", "--no-checkpointing"],
        ["--mode", "gptq", "--bits", "4", "--group", "128", "--liger", "--no-checkpointing"],
        ["--mode", "gptq", "--bits", "2", "--group", "64", "--liger", "--no-checkpointing"]]
CORE_LITE = [c for c in CORE if "3" not in c and c != ["--mode", "bf16", "--liger"]]  # peers, 4 and 2 bit
# what each host-side change of the fused path gives (kernels/launch.py, adapters/siblings.py)
AB = [["--mode", "gptq", "--bits", "4", "--group", "128", "--liger"],
      ["--mode", "gptq", "--bits", "4", "--group", "128", "--liger", "--no-siblings"],
      ["--mode", "gptq", "--bits", "4", "--group", "128", "--liger", "--slow-launch"],
      ["--mode", "gptq", "--bits", "4", "--group", "128", "--liger", "--no-siblings", "--slow-launch"]]
# torch.compile of the decoder blocks (gptqlora.train.compile), gptqlora and the peers, against the same
# tools uncompiled in the same run (the ratios stay against uncompiled NF4 / bf16: what users have)
G4, G2 = ["--mode", "gptq", "--bits", "4", "--group", "128"], ["--mode", "gptq", "--bits", "2", "--group", "64"]
# in the order that matters when the suite's time budget cuts it short (a compiled 7B config: ~2 min)
COMPILE = [["--mode", "nf4"], [*G4, "--liger"], [*G4, "--liger", "--compile"], [*G4, "--compile"], ["--mode", "bf16"],
           [*G2, "--liger"], [*G2, "--liger", "--compile"], ["--mode", "bf16", "--compile"], ["--mode", "nf4", "--compile"]]
# what `finetune` does by default on CUDA (--compile auto: compiled blocks, Liger's fused loss only) against
# the peers as users run them, then the peers' own best (compiled); the order matters when the budget cuts
DEFAULT = [["--mode", "nf4"], ["--mode", "bf16"], [*G4, "--liger", "--compile"], [*G2, "--liger", "--compile"],
           ["--mode", "nf4", "--compile"], ["--mode", "bf16", "--compile"]]
ABLATIONS = [["--mode", "gptq", "--bits", "4", "--group", "128"],  # no Liger
             ["--mode", "gptq", "--bits", "4", "--group", "128", "--liger", "--no-fused"],  # PEFT's LoRA path
             ["--mode", "gptq", "--bits", "4", "--group", "128", "--liger", "--no-siblings"],  # q/k/v one by one
             ["--mode", "gptq", "--bits", "4", "--group", "128", "--liger", "--slow-launch"],  # Triton's launch
             ["--mode", "gptq", "--bits", "4", "--group", "128", "--kernel", "torch"]]  # the old reference path


def run(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("train_step.py")), *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"args": args, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"args": args, "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return {"args": args, **json.loads(lines[-1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="core", choices=("core", "core-lite", "best", "ab", "ablations", "compile", "default", "all"))
    ap.add_argument("--batches", default="16x256,1x2048", help="comma-separated BSxSEQ shapes")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--steps", default="5")
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget_s", type=float, default=480, help="stop starting new configurations after this")
    ap.add_argument("--profile", action="append", default=[],
                    help="a configuration to profile (at both batch shapes), as its arguments, e.g. '--mode bf16'")
    a = ap.parse_args()
    configs = {"core": CORE, "core-lite": CORE_LITE, "best": BEST, "ab": AB, "ablations": ABLATIONS,
               "compile": COMPILE, "default": DEFAULT, "all": CORE + ABLATIONS}[a.set]
    out = Path(a.out) / "train_suite.jsonl"
    t0, recs = time.time(), []
    batches = [tuple(int(v) for v in b.split("x")) for b in a.batches.split(",")]
    for bs, seq in batches:
        for c in configs:
            if time.time() - t0 > a.budget_s:
                recs.append({"args": c, "bs": bs, "seq": seq, "error": "skipped: suite time budget spent"})
                continue
            args = [*c, "--shape", a.shape, "--bs", str(bs), "--seq", str(seq), "--steps", a.steps]
            if " ".join(c) in a.profile:
                args.append("--profile")
            r = run(args, timeout=420 if "--compile" in c else 240)  # inductor's first compilation
            recs.append(r)
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            sys.stderr.write(f"[{time.time() - t0:5.0f}s] {r.get('mode', c)} {bs}x{seq}: "
                             f"{r.get('tokens_per_s', r.get('error'))}\n")
    table(recs)
    return 0


def table(recs: list[dict]) -> None:
    p = sys.stdout.write
    ok = [r for r in recs if "tokens_per_s" in r]
    if ok:
        p(f"device: {ok[0]['gpu']}, date: {ok[0]['date']}, shape: {ok[0]['shape']}\n\n")
    p("| config | batch | tokens/s | x NF4 | x bf16 | peak GiB | loaded GiB |\n|---|---|---|---|---|---|---|\n")
    for r in recs:
        batch = f"{r.get('bs', '')}x{r.get('seq', '')}"
        if "tokens_per_s" not in r:
            p(f"| {' '.join(r['args'])} | {batch} | {r['error']} | | | | |\n")
            continue
        peers = {x["mode"]: x["tokens_per_s"] for x in ok if (x["bs"], x["seq"]) == (r["bs"], r["seq"])}
        suffix = "-nockpt" if r["mode"].endswith("-nockpt") else ""  # peers at the same checkpointing
        ratio = {m: f"{r['tokens_per_s'] / peers[m + suffix]:.2f}" if m + suffix in peers else "-"
                 for m in ("nf4", "bf16")}
        p(f"| {r['mode']} | {batch} | {r['tokens_per_s']:,} | {ratio['nf4']} | {ratio['bf16']} | {r['peak_gib']} | "
          f"{r['weights_gib']} |\n")
    for r in ok:
        if "profile" in r:
            p(f"\nprofile of {r['mode']} {r['bs']}x{r['seq']} (one step):\n{r['profile']}\n")


if __name__ == "__main__":
    raise SystemExit(main())
