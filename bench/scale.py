"""LLaMA-65B GPTQ-LoRA on one GPU: loaded memory, peak memory, tokens/s, and what the peak is made of.

    python bench/scale.py                              # 65B, 2 and 4 bit, bs1x2048 and bs16x256, full checkpointing
    python bench/scale.py --set speed                  # the same with --gradient_checkpointing auto (none where it fits)
    python bench/scale.py --set memory                 # 2 bit bs1x2048: loss / offload / 8-bit Adam variants
    python bench/scale.py --set memory-both            # 4 and 2 bit bs1x2048: offload and paged 8-bit Adam together
    python bench/scale.py --device cpu --shape tiny --set smoke --batches 1x64   # smoke test (no CUDA figures)

One process per configuration (bench/train_step.py builds the packed model directly on the device: random
codes, act-order g_idx; no fp16 weights). Each runs what `gptqlora finetune` runs: LoRA r=8 on the seven
projections, dropout 0.05, bf16 autocast, Liger where installed, the chunked loss otherwise, the chosen
checkpointing plan, AdamW (or paged 8-bit AdamW). The median of --steps steps after two warm-up steps.

The breakdown (GiB, from torch.cuda memory counters on the last step):
  weights      allocated after building and wrapping (packed base, embeddings, lm_head, LoRA)
  optimizer    the optimizer's state tensors;  grads: the LoRA gradients (alive from backward to the step)
  blocks       allocated growth from the start of forward to the final norm: what the decoder blocks keep
               (only their inputs when checkpointed)
  head+loss    growth from the final norm to the loss: lm_head / logits / cross-entropy residue
  backward     backward's peak above the end-of-forward level: recomputed block, dequantized weights,
               gradients in flight (peak GiB is the highest of forward, backward and optimizer step)
  cache        reserved - allocated at the peak: the caching allocator's free blocks (fragmentation)
Prints one JSON line per configuration, then a markdown table; --out DIR also writes DIR/scale.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import TARGETS, build_gptq  # noqa: E402

GIB = 2**30
BATCHES = ((1, 2048), (16, 256))
SETS = {
    # (bits, group, extra flags)
    "memory-target": [(2, 64, ["--checkpointing", "full"]), (4, 128, ["--checkpointing", "full"])],
    "speed": [(2, 64, ["--checkpointing", "auto"]), (4, 128, ["--checkpointing", "auto"])],
    "memory": [(2, 64, ["--checkpointing", "full", "--loss", "full"]),
               (2, 64, ["--checkpointing", "full", "--offload"]),
               (2, 64, ["--checkpointing", "full", "--optim", "paged_adamw_8bit"]),
               (2, 64, ["--checkpointing", "full", "--no-expandable-segments"])],
    # the two memory options together, at both widths (each alone was measured at 2 bit only)
    "memory-both": [(4, 128, ["--checkpointing", "full", "--offload", "--optim", "paged_adamw_8bit"]),
                    (2, 64, ["--checkpointing", "full", "--offload", "--optim", "paged_adamw_8bit"])],
    "smoke": [(2, 64, ["--checkpointing", "selective", "--offload"])],  # one quick run, to test this script
}


def one(a: argparse.Namespace) -> dict:
    """One configuration in this process."""
    from gptqlora.adapters import GPTQLoraConfig, get_peft_model
    from gptqlora.devices import configure_cuda_allocator
    from gptqlora.train import checkpointing
    from gptqlora.train.liger import apply_liger
    from gptqlora.train.loss import apply_chunked_loss

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    expandable = cuda and (configure_cuda_allocator(a.expandable_segments) or
                           "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    alloc = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    t0 = time.perf_counter()
    model = build_gptq(a.shape, a.bits, a.group, device)
    model.config.use_cache = False
    liger = apply_liger(model, "auto" if a.liger else "off")
    chunked = a.loss == "chunked" or (a.loss == "auto" and not liger)
    if chunked:
        apply_chunked_loss(model)
    pm = get_peft_model(model, GPTQLoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    dtype = torch.bfloat16 if cuda else None
    plan = checkpointing.setup(pm, a.checkpointing, fraction=a.fraction, batch=a.bs, seq=a.seq, dtype=dtype,
                               optim=a.optim, offload=a.offload)
    params = [p for p in pm.parameters() if p.requires_grad]
    if a.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    build_s = time.perf_counter() - t0
    sync()
    loaded = alloc()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    x = torch.randint(0, model.config.vocab_size, (a.bs, a.seq), device=device)
    marks: dict[str, int] = {}
    model.model.norm.register_forward_pre_hook(lambda m, i: marks.__setitem__("norm", alloc()))

    def step() -> tuple[float, dict]:
        m = {"start": alloc()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = pm(input_ids=x, labels=x).loss
        m["norm"], m["forward"] = marks["norm"], alloc()
        peak = (lambda: torch.cuda.max_memory_allocated(device)) if cuda else (lambda: 0)
        m["forward_peak"] = peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        loss.backward()
        m["backward_peak"] = peak()
        m["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        opt.step()
        m["step_peak"] = max(m["forward_peak"], peak())  # the optimizer step's temporaries included
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        return float(loss), m

    times, losses, peak, reserved_at_peak, budget_hit = [], [], 0, 0, False
    for i in range(a.steps + 2):
        sync()
        t = time.perf_counter()
        loss, m = step()
        sync()
        times.append(time.perf_counter() - t)
        losses.append(loss)
        if cuda and m["step_peak"] >= peak:
            peak, reserved_at_peak = m["step_peak"], torch.cuda.memory_stats(device)["reserved_bytes.all.peak"]
        if time.perf_counter() - t0 > a.max_s and i >= 2:
            budget_hit = True  # fewer steps rather than a killed process
            break
    measured = times[2:] or times[-1:]
    med = sorted(measured)[len(measured) // 2]
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t))
    breakdown = {"weights": loaded, "optimizer": opt_bytes, "grads": m["grads"],
                 "blocks": m["norm"] - m["start"], "head+loss": m["forward"] - m["norm"],
                 "backward": m["backward_peak"] - m["forward"], "cache": reserved_at_peak - peak}
    return dict(shape=a.shape, bits=a.bits, group=a.group, bs=a.bs, seq=a.seq,
                checkpointing=f"{plan.mode}" + (f" {len(plan.checkpointed)}/{len(checkpointing.decoder_blocks(pm))}"
                                                if plan.mode == "selective" else ""),
                loss="liger" if liger and not chunked else "chunked" if chunked else "full", offload=a.offload,
                optim=a.optim, expandable_segments=expandable, step_s=round(med, 3),
                tokens_per_s=round(a.bs * a.seq / med), loaded_gib=round(loaded / GIB, 2),
                peak_gib=round(peak / GIB, 2), reserved_peak_gib=round(reserved_at_peak / GIB, 2),
                breakdown_gib={k: round(v / GIB, 3) for k, v in breakdown.items()},
                trainable=sum(p.numel() for p in params), steps_timed=len(measured), budget_hit=budget_hit,
                build_s=round(build_s, 1), losses=[round(v, 4) for v in losses],
                loss_finite=all(math.isfinite(v) for v in losses), plan=plan.reason,
                gpu=torch.cuda.get_device_name(device) if cuda else "cpu", date=time.strftime("%Y-%m-%d"))


def table(recs: list[dict]) -> str:
    head = ("| bits | batch | checkpointing | loss | extra | loaded GiB | peak GiB | tokens/s | weights | optim+grads "
            "| blocks | head+loss | backward | cache |\n|" + "---|" * 14 + "\n")
    rows = []
    for r in recs:
        if "error" in r:
            rows.append(f"| {r.get('bits', '')} | {r.get('bs', '')}x{r.get('seq', '')} | {r['error']} |")
            continue
        b = r["breakdown_gib"]
        extra = ", ".join(x for x in (("offload" if r["offload"] else ""),
                                      (r["optim"] if r["optim"] != "adamw_torch" else ""),
                                      ("" if r["expandable_segments"] or r["gpu"] == "cpu" else "no expandable"))
                          if x) or "-"
        rows.append(f"| {r['bits']} | {r['bs']}x{r['seq']} | {r['checkpointing']} | {r['loss']} | {extra} | "
                    f"{r['loaded_gib']} | {r['peak_gib']} | {r['tokens_per_s']:,} | {b['weights']:.2f} | "
                    f"{b['optimizer'] + b['grads']:.2f} | {b['blocks']:.2f} | {b['head+loss']:.2f} | "
                    f"{b['backward']:.2f} | {b['cache']:.2f} |")
    return head + "\n".join(rows) + "\n"


def suite(a: argparse.Namespace) -> int:
    configs = [c for name in a.set for c in SETS[name]]
    batches = [tuple(map(int, b.split("x"))) for b in a.batches.split(",")] if a.batches else \
        [(1, 2048)] if a.set in (["memory"], ["memory-both"]) else BATCHES
    t0, recs = time.time(), []
    for bits, group, extra in configs:
        for bs, seq in batches:
            args = ["--one", "--shape", a.shape, "--bits", str(bits), "--group", str(group), "--bs", str(bs),
                    "--seq", str(seq), "--steps", str(a.steps), "--device", a.device, *extra,
                    *(["--no-liger"] if not a.liger else [])]
            if time.time() - t0 > a.budget_s:
                recs.append({"bits": bits, "bs": bs, "seq": seq, "error": "skipped: --budget_s spent"})
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), *args]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout_s)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
                rec = json.loads(lines[-1]) if p.returncode == 0 and lines else \
                    {"bits": bits, "bs": bs, "seq": seq,
                     "error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}
            except subprocess.TimeoutExpired:
                rec = {"bits": bits, "bs": bs, "seq": seq, "error": f"timed out after {a.timeout_s} s"}
            rec["args"] = " ".join(extra)
            recs.append(rec)
            print(json.dumps(rec), flush=True)
            sys.stderr.write(f"[{time.time() - t0:5.0f}s] {bits} bit {bs}x{seq} {' '.join(extra)}: "
                             f"{rec.get('tokens_per_s', rec.get('error'))} tokens/s, peak {rec.get('peak_gib')}\n")
            if a.out:
                with (Path(a.out) / "scale.jsonl").open("a") as f:
                    f.write(json.dumps(rec) + "\n")
    ok = next((r for r in recs if "gpu" in r), None)
    if ok:
        print(f"\n{a.shape}, {ok['gpu']}, {ok['date']}: LoRA r=8 on 7 projections ({ok['trainable']:,} trainable), "
              f"median of {a.steps} steps\n")
    print(table(recs))
    return 0 if all("error" not in r for r in recs) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", choices=sorted(SETS), help="configurations (default: memory-target)")
    ap.add_argument("--shape", default="65b", help="train_step.py's SHAPES: tiny, 7b, 13b, 65b")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after two warm-up steps")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (--shape tiny)")
    ap.add_argument("--budget_s", type=float, default=500, help="start no configuration after this many seconds")
    ap.add_argument("--timeout_s", type=int, default=240, help="per configuration")
    ap.add_argument("--batches", help="batch shapes, e.g. 1x2048,16x256 (default: both; --set memory: 1x2048)")
    ap.add_argument("--out", help="also append every record to OUT/scale.jsonl")
    ap.add_argument("--no-liger", dest="liger", action="store_false")
    # one configuration (what the suite runs in a child process)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--bs", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--checkpointing", default="full", choices=("auto", "full", "selective", "none"))
    ap.add_argument("--fraction", type=float, default=0.5, help="--checkpointing selective: blocks recomputed")
    ap.add_argument("--loss", default="auto", choices=("auto", "chunked", "full"))
    ap.add_argument("--offload", action="store_true", help="checkpointed block inputs in pinned host memory")
    ap.add_argument("--optim", default="adamw_torch", choices=("adamw_torch", "paged_adamw_8bit"))
    ap.add_argument("--no-expandable-segments", dest="expandable_segments", action="store_false")
    ap.add_argument("--max_s", type=float, default=200, help="one configuration: stop timing steps after this")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a)))
        return 0
    a.set = a.set or ["memory-target"]
    return suite(a)


if __name__ == "__main__":
    sys.exit(main())
