"""Chain bench: the one-token kernel asking L2 for the next launch's packed weight (issue 16, session 25).

A 7B decode step at batch 1 runs 4 GPTQ launches a block (q|k|v, o, gate|up, down: 25, 8, 45 and 23 MB at 4
bit g128) and each is too short for its ramp and split-K tail: 4096x4096 takes ~11-12 us for ~3 us of bytes
(session 12's ncu: DRAM 19% of peak over the kernel). One layer timed alone cannot show what asking ahead buys,
because the gain is across launches. So this times chains: `--layers` blocks of the 7B's four launches (distinct
random weights, act-order, r=8 fp32 adapters; tanh between launches stands in for the norms and activations),
captured in one CUDA graph, for each setting of GPTQLORA_L2_AHEAD and its companions (kernels/gemv_m1.py
`ahead_config`). Each variant's last output must equal the no-prefetch chain's bit for bit (a prefetch is a
hint). "off" runs first and last: the spread between the two is this machine's drift.

    python bench/l2_ahead.py --json $OUT/l2_ahead.json [--bits 4,2] [--layers 6]          (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).parent))

from gemv_sweep import GROUP, packed_layer  # noqa: E402

from gptqlora.kernels import gemv as G  # noqa: E402
from gptqlora.kernels import gemv_m1  # noqa: E402

# (K, N, bounds) of a 7B block's launches: q|k|v and gate|up as one launch each (nn/sibling_gemv.py)
UNITS = ((4096, 12288, (4096, 8192)), (4096, 4096, None), (4096, 22016, (11008, 22016)), (11008, 4096, None))
R = 8
ENVS = gemv_m1.L2_ENVS
VARIANTS = {  # name -> (MB ahead, at, evict_last, own evict_first, own words asked first)
    "off": ("0", "end", "1", "0", "0"),
    "end8": ("8", "end", "1", "0", "0"),
    "end16": ("16", "end", "1", "0", "0"),
    "end32": ("32", "end", "1", "0", "0"),
    "endall": ("all", "end", "1", "0", "0"),
    "start16": ("16", "start", "1", "0", "0"),
    "end16plain": ("16", "end", "0", "0", "0"),
    "end32own": ("32", "end", "1", "1", "0"),
    "own": ("0", "end", "1", "1", "0"),
    "self": ("0", "end", "1", "0", "1"),  # session 25, after the first run: each program's own words first
    "self_end8": ("8", "end", "1", "0", "1"),
}


def chain(bits: int, layers: int, device) -> list[dict]:
    """The launches' tensors, each with the next launch's packed weight as `ahead` (the last: the first's)."""
    units = []
    for i in range(layers):
        for j, (k, n, bounds) in enumerate(UNITS):
            qweight, zeros, scales, g_idx = packed_layer(k, n, bits, device, seed=100 * i + j)
            plan = G.plan_gemv(qweight, g_idx, bits, GROUP[bits], repack=True)
            widths = [n] if bounds is None else [b - a for a, b in zip((0, *bounds), (*bounds, n)) if b > a]
            gen = torch.Generator(device=device).manual_seed(7 + 100 * i + j)
            a = [torch.randn(R, k, device=device, generator=gen) / k ** 0.5 for _ in widths]
            b = [torch.randn(w, R, device=device, generator=gen) * 0.05 for w in widths]
            units.append(dict(k=k, n=n, bounds=bounds, qweight=qweight, zeros=zeros, scales=scales, g_idx=g_idx,
                              plan=plan, a=a, b=b))
    for u, nxt in zip(units, units[1:] + units[:1]):
        u["ahead"] = nxt["plan"].qweight
    return units


def run_chain(units: list[dict], x0: torch.Tensor, bits: int, sms: int) -> torch.Tensor:
    x = x0
    for u, nxt in zip(units, units[1:] + units[:1]):
        y = G.gemv_triton(x, u["qweight"], u["zeros"], u["scales"], u["g_idx"], bits, u["plan"], u["a"], u["b"],
                          2.0, sms=sms, bounds=u["bounds"], ahead=u["ahead"])
        x = torch.tanh(y[:, :nxt["k"]])  # (1, K of the next launch); a norm's worth of small kernel
    return x


def time_variant(units, x0, bits, sms, reps: int) -> tuple[float, torch.Tensor]:
    """Median us of one graph replay of the chain, and its output."""
    for _ in range(2):
        out = run_chain(units, x0, bits, sms)  # compile, pick configs
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_chain(units, x0, bits, sms)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times), out.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,2", help="bit widths, comma-separated")
    ap.add_argument("--layers", type=int, default=6, help="7B blocks in the chain (101 MB each at 4 bit)")
    ap.add_argument("--variants", default=",".join(VARIANTS) + ",off", help="names from VARIANTS, in order")
    ap.add_argument("--reps", type=int, default=30, help="graph replays timed per variant (the median is kept)")
    ap.add_argument("--budget-s", type=float, default=240, help="start no variant after this many seconds")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    t0, rows = time.time(), []
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for bits in map(int, a.bits.split(",")):
        units = chain(bits, a.layers, device)
        x0 = torch.randn(1, UNITS[0][0], device=device, dtype=torch.bfloat16)
        base = None
        for name in a.variants.split(","):
            if time.time() - t0 > a.budget_s:
                rows.append(dict(bits=bits, variant=name, skipped="over --budget-s"))
                continue
            os.environ.update(dict(zip(ENVS, VARIANTS[name])))
            us, out = time_variant(units, x0, bits, sms, a.reps)
            if base is None:
                base = (us, out)
            row = dict(bits=bits, variant=name, env=dict(zip(ENVS, VARIANTS[name])), layers=a.layers,
                       chain_us=round(us, 1), per_block_us=round(us / a.layers, 2),
                       x_first_off=round(us / base[0], 3), equal_to_off=bool(torch.equal(out, base[1])))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del units
        torch.cuda.empty_cache()
    for env in ENVS:
        os.environ.pop(env, None)
    bad = [r for r in rows if r.get("equal_to_off") is False]
    print(f"variants whose output differs from off's: {len(bad)}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                                                rows=rows), indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
