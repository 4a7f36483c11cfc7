"""Tune the small-M decode kernel (kernels/gemv.py) per 7B layer shape in one GPU call, and write the table
that `pick_config` reads.

    python bench/gemv_sweep.py --json $OUT/gemv_sweep.json          (H200: < 3 min; --budget-s caps it)
    GPTQLORA_GEMV_CONFIGS=$OUT/gemv_sweep.json python bench/decode.py ...    (use the table without committing it)
    cp $OUT/gemv_sweep.json gptqlora/kernels/gemv_configs.json               (ship it: pick_config reads it)
    TRITON_INTERPRET=1 python bench/gemv_sweep.py --small --json /tmp/s.json  (CPU smoke test; figures mean nothing)

For each shape (4096->4096, 4096->11008, 11008->4096, and the siblings' 4096->12288 and 4096->22016), bit
width (--bits, default 2,3,4) and M (1, 8; the table's key is M = 1 or M = 2..16), act-order read through
the repacked copy, with an r=8 LoRA fused (the decode path of a model with an adapter), bf16:

1. split scan: the heuristic tiles with SPLIT 1..32 (a runtime argument: no compilation);
2. tile scan at the best split's program count: at M = 1 BN {128, 256} x num_warps {2, 4, 8} x
   BK {32, 64, 128}, at M = 8 BN {64, 128, 256} x num_warps {2, 4, 8} x BK {64, 128}; num_stages 3;
3. split rescan around the best tiles (x0.5, x1, x2).

`--stages 1,2,3,4` runs another scan instead (issue 16, session 13): from today's choice for the shape
(`pick_config`: the shipped table over the heuristic) it tries the loop's loads staged through shared memory
(`loop_stages`: Triton's pipeliner issues cp.async for the next tiles while one is computed, which it does for
a loop without a dot only when asked) x SPLIT {x1, x0.5, x0.25} (fewer, longer programs: more tiles for the
pipeline to overlap) x BK {today's, half}. The row then also holds the best time per stage count, and
"default_us" is today's choice.

Each candidate is checked against the heuristic's output first (a wrong config is never picked), then timed
inside a CUDA graph (triton.testing.do_bench_cudagraph) over enough copies of the layer that every call reads
from HBM, not L2. The bf16 `x @ W` of the same shape and a device copy's bandwidth (read + write, also graph
timed) are measured in the same run. The kernels of stage 2 are compiled first by parallel worker processes
(`--jobs`; Triton's disk cache): 36 compilations per bit width.

Prints a table (default vs best us, % of copy bandwidth, x bf16) and writes JSON: {"configs": {key: config},
"rows": [...], ...}; the "configs" part is the table format of kernels/gemv.py (`tuned_key`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gptqlora.formats.gptq import pack_cols, pack_rows
from gptqlora.kernels import gemv as G

# the 7B layers, then q|k|v and gate|up side by side (nn/sibling_gemv.py: one launch each when decoding)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016))
SMALL_SHAPES = ((256, 128), (256, 384), (384, 128))
GROUP = {2: 64, 3: 128, 4: 128, 8: 128}
BN = {1: (32, 64, 128, 256), 16: (64, 128, 256)}  # per M bucket (call 7: BN 512 never won at M = 1; 32/64: few or no splits)
WARPS = (2, 4, 8)
BK = {1: (32, 64, 128), 16: (64, 128)}  # per M bucket (FMA path, tensor-core path)
SMALL_GRID = ((32, 64), (32,), (4,))
SPLITS = (1, 2, 4, 8, 16, 32, 64)
R = 8


def packed_layer(k, n, bits, device, seed, group: int | None = None, act_order: bool = True):
    """(qweight, zeros, scales, g_idx) of a random layer; `group` GROUP[bits] unless given."""
    g = torch.Generator(device=device).manual_seed(seed)
    gs = group or GROUP[bits]
    codes = torch.randint(0, 2**bits, (k, n), device=device, dtype=torch.int32, generator=g)
    zeros = torch.randint(0, 2**bits, (-(-k // gs), n), device=device, dtype=torch.int32, generator=g)
    scales = (torch.rand(zeros.shape, device=device, generator=g) * 0.01 + 1e-3).half()
    g_idx = torch.arange(k, device=device, dtype=torch.int32) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, device=device, generator=g)]
    return pack_rows(codes, bits), pack_cols(zeros, bits), scales, g_idx


def tile_grid(m: int, bits: int, small: bool) -> list[dict]:
    """Stage 2's candidates."""
    bns, bks, warps = SMALL_GRID if small else (BN[1 if m == 1 else 16], BK[1 if m == 1 else 16], WARPS)
    return [dict(BN=bn, BK=bk, num_warps=w, num_stages=3) for bn, bk, w in itertools.product(bns, bks, warps)]


class Timer:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def us(self, fn, rep_ms: int = 25) -> float:
        if self.cuda:
            import triton

            return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6


def warm(bits_list, ms, small: bool, jobs: int, device, stages: str | None = None) -> str:
    """Compile stage 2's kernels (or the stage scan's) in worker processes (Triton's disk cache), `jobs` at a time."""
    if device.type != "cuda" or jobs <= 1:
        return "serial"
    argv = ["--bits", ",".join(map(str, bits_list)), "--ms", ",".join(map(str, ms))] + (["--small"] if small else []) \
        + (["--stages", stages] if stages else [])
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--warm-worker", f"{i}/{jobs}", *argv],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(jobs)]
    errs = [p.communicate()[1].strip().splitlines()[-1:] for p in procs if p.wait()]
    return "ok" if not errs else f"{len(errs)} of {jobs} workers failed: {errs[0]}"


def stage_grid(m: int, k: int, n: int, bits: int, plan, sms: int, stages: list[int]) -> list[dict]:
    """`--stages`' candidates for one shape: today's choice with its loads staged, fewer splits, half BK."""
    base = G.pick_config(m, k, n, bits, plan, sms)
    bks = sorted({base["BK"], max(16, base["BK"] // 2)}, reverse=True)
    return [{**base, "loop_stages": st, "SPLIT": max(1, round(base["SPLIT"] * f)), "BK": bk}
            for st, f, bk in itertools.product(stages, (1.0, 0.5, 0.25), bks)]


def warm_worker(share: str, bits_list, ms, small: bool, device, stages: list[int] | None = None) -> int:
    i, n = map(int, share.split("/"))
    shapes = SMALL_SHAPES if small else SHAPES
    k, nn = shapes[0]
    if stages:  # the stage scan's candidates differ per shape (today's choice is per shape)
        jobs = [(bits, m, cfg, kk, n_) for bits in bits_list for m in ms for kk, n_ in shapes
                for cfg in stage_grid(m, kk, n_, bits, _plan_of(kk, n_, bits, device), G._sm_count(device), stages)]
    else:
        jobs = [(bits, m, cfg, k, nn) for bits in bits_list for m in ms for cfg in tile_grid(m, bits, small)]
    seen, layers = set(), {}
    for bits, m, cfg, k, nn in jobs[i::n]:
        key = json.dumps([bits, m, {f: v for f, v in cfg.items() if f != "SPLIT"}], sort_keys=True)
        if key in seen:  # one compilation per constexpr set: SPLIT is a runtime argument
            continue
        seen.add(key)
        if (bits, k, nn) not in layers:
            p = packed_layer(k, nn, bits, device, 0)
            layers[bits, k, nn] = p, G.plan_gemv(p[0], p[3], bits, GROUP[bits], True)
        p, plan = layers[bits, k, nn]
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        a = torch.randn(R, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(nn, R, device=device, dtype=torch.bfloat16)
        try:  # split-K on (the 7B shapes need it at every tile size); SPLIT's value is a runtime argument
            G.gemv_triton(x, *p, bits, plan, a, b, 2.0, config={**cfg, "SPLIT": 2})
        except Exception:  # e.g. out of resources: the main process skips it too
            pass
    return 0


def _plan_of(k: int, n: int, bits: int, device):
    """A plan of the layer shape (for pick_config, which reads only its group and row order)."""
    qw = torch.empty(k * bits // 32, n, dtype=torch.int32, device=device)
    return G.GemvPlan(qw, None, True, GROUP[bits], torch.zeros(1, dtype=torch.int32, device=device))


def sweep_shape(k, n, bits, m, device, timer, copy_gbps, l2_bytes, small, deadline, stages=None) -> dict:
    gs = GROUP[bits]
    packed_bytes = k * n * bits / 8 + (k // gs) * n * (2 + bits / 8) + 4 * k + 2 * R * (k + n)
    copies = max(1, math.ceil(l2_bytes / packed_bytes))
    layers = [packed_layer(k, n, bits, device, s) for s in range(copies)]
    plans = [G.plan_gemv(p[0], p[3], bits, gs, True) for p in layers]
    g = torch.Generator(device=device).manual_seed(k + n + bits + m)
    x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
    a = torch.randn(R, k, device=device, generator=g, dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, R, device=device, generator=g, dtype=torch.bfloat16) * 0.05
    sms = G._sm_count(device)
    default = G.heuristic_config(m, k, n, bits, plans[0], sms)
    want = G.gemv_triton(x, *layers[0], bits, plans[0], a, b, 2.0, config=default).float()
    tried: dict[str, dict] = {}

    def legal(cfg):
        return G.legal_config({**default, **cfg}, k, bits, plans[0])

    def measure(cfg) -> float:
        cfg = legal(cfg)
        key = json.dumps(cfg, sort_keys=True)
        if key in tried:
            return tried[key]["us"]
        try:
            y = G.gemv_triton(x, *layers[0], bits, plans[0], a, b, 2.0, config=cfg).float()
            err = float((y - want).norm() / want.norm())
            us = timer.us(lambda: [G.gemv_triton(x, *p, bits, pl, a, b, 2.0, config=cfg)
                                   for p, pl in zip(layers, plans)]) / copies if err < 1e-2 else math.inf
            tried[key] = {"cfg": cfg, "us": us, "err": err}
        except Exception as e:  # out of resources etc.: not a candidate
            tried[key] = {"cfg": cfg, "us": math.inf, "error": type(e).__name__}
        return tried[key]["us"]

    if stages:  # the stage scan: from today's choice
        today = G.pick_config(m, k, n, bits, plans[0], sms)
        t_default = measure(today)
        for cfg in stage_grid(m, k, n, bits, plans[0], sms, stages):
            if time.time() > deadline:
                break
            measure(cfg)
    else:
        t_default = measure(default)
        # 1. split scan with the heuristic's tiles
        best_split = min(SPLITS, key=lambda s: measure({"SPLIT": s}) if time.time() < deadline else math.inf)
        programs = best_split * -(-n // default["BN"])
        # 2. tiles, at the best split's program count
        for cfg in tile_grid(m, bits, small):
            if time.time() > deadline:
                break
            measure({**cfg, "SPLIT": max(1, round(programs / -(-n // cfg["BN"])))})
        best = min(tried.values(), key=lambda r: r["us"])
        # 3. split around the best tiles
        for f in (0.5, 2.0):
            if time.time() < deadline:
                measure({**best["cfg"], "SPLIT": max(1, round(best["cfg"]["SPLIT"] * f))})
    best = min(tried.values(), key=lambda r: r["us"])
    by_stages = {}
    for r in tried.values():
        st = r["cfg"].get("loop_stages", 1)
        by_stages[st] = min(by_stages.get(st, math.inf), r["us"])
    dense = [torch.randn(k, n, device=device, dtype=torch.bfloat16) for _ in range(max(1, math.ceil(l2_bytes / (2 * k * n))))]
    t_bf16 = timer.us(lambda: [x @ w for w in dense]) / len(dense)
    gbps = packed_bytes / best["us"] / 1e3 if math.isfinite(best["us"]) else 0.0
    row = {"shape": f"{k}x{n}", "bits": bits, "m": m, "key": G.tuned_key(bits, m, k, n, True),
           "default_us": round(t_default, 1), "best_us": round(best["us"], 1),
           "gain": round(t_default / best["us"], 2) if best["us"] > 0 else None, "bf16_us": round(t_bf16, 1),
           "x_bf16": round(t_bf16 / best["us"], 2), "gbps": round(gbps), "pct_copy": round(100 * gbps / copy_gbps, 1),
           "tried": len(tried), "default": today if stages else default, "best": best["cfg"],
           "best_us_by_loop_stages": {st: round(us, 1) for st, us in sorted(by_stages.items()) if math.isfinite(us)}}
    del layers, plans, dense
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4", help="comma-separated (default 2,3,4: the widths decode is measured at; 8 adds ~1 min)")
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--small", action="store_true", help="interpreter-sized shapes and grid (CPU smoke test)")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="compile workers (GPU)")
    ap.add_argument("--budget-s", type=float, default=200, help="stop trying configs after this many seconds")
    ap.add_argument("--json", help="write the table and all rows here")
    ap.add_argument("--shapes", help="comma-separated KxN to sweep (default: all of SHAPES)")
    ap.add_argument("--merge", help="a table (e.g. gptqlora/kernels/gemv_configs.json) whose configs this run's "
                    "are laid over in the JSON written: keys not swept here are kept")
    ap.add_argument("--stages", help="comma-separated loop stage counts (e.g. 1,2,3,4): scan staged loads from today's "
                    "choice per shape instead of the tile sweep (see above)")
    ap.add_argument("--warm-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    bits_list = [int(b) for b in a.bits.split(",")]
    ms = [int(m) for m in a.ms.split(",")]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and (not a.small or os.environ.get("TRITON_INTERPRET") != "1"):
        sys.stderr.write("no CUDA device: use --small under TRITON_INTERPRET=1 for the smoke test\n")
        return 2
    stages = [int(v) for v in a.stages.split(",")] if a.stages else None
    if a.warm_worker:
        return warm_worker(a.warm_worker, bits_list, ms, a.small, device, stages)
    t0 = time.time()
    timer = Timer(cuda)
    nbytes = 2**30 if cuda else 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * nbytes / timer.us(lambda: dst.copy_(src)) / 1e3
    del src, dst
    warm_state = warm(bits_list, ms, a.small, a.jobs, device, a.stages)
    t_warm = time.time() - t0
    print(f"copy {copy_gbps:.0f} GB/s (read + write, graph-timed); compile warm-up {warm_state} in {t_warm:.0f} s",
          flush=True)
    shapes = SMALL_SHAPES if a.small else SHAPES
    if a.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    l2 = 256 * 2**20 if cuda else 0
    work = [(k, n, bits, m) for bits in bits_list for (k, n) in shapes for m in ms]
    rows = []
    for i, (k, n, bits, m) in enumerate(work):
        left = t0 + a.budget_s - time.time()
        deadline = time.time() + left / (len(work) - i)  # an equal share of what is left, per shape
        rows.append(sweep_shape(k, n, bits, m, device, timer, copy_gbps, l2, a.small, deadline, stages))
        print({c: rows[-1][c] for c in ("shape", "bits", "m", "default_us", "best_us", "pct_copy", "x_bf16", "best",
                                        "best_us_by_loop_stages")},
              flush=True)
    configs = {r["key"]: {f: r["best"][f] for f in G.TUNABLE if f in r["best"]} for r in rows if r["best_us"] and math.isfinite(r["best_us"])}
    if a.merge:
        configs = {**G.load_table(a.merge), **configs}
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "copy_gbps": round(copy_gbps), "warm": warm_state, "wall_s": round(time.time() - t0),
           "configs": configs, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    cols = ["shape", "bits", "m", "default_us", "best_us", "gain", "bf16_us", "x_bf16", "gbps", "pct_copy", "tried"]
    print("| " + " | ".join(cols) + " | best |\n|" + "---|" * (len(cols) + 1))
    for r in rows:
        b = r["best"]
        print("| " + " | ".join(str(r[c]) for c in cols) +
              f" | BN {b['BN']} BK {b['BK']} SPLIT {b['SPLIT']} warps {b['num_warps']} stages {b.get('loop_stages', 1)} |")
    print(f"{out['device']}, {out['wall_s']} s, copy {copy_gbps:.0f} GB/s; table: {len(configs)} configs"
          + (f" in {a.json}" if a.json else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
