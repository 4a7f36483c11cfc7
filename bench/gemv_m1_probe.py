"""Probe: two other one-token decode kernels, and where today's kernel spends its time (issue 16).

Today's M = 1 kernel (kernels/gemv.py) reads GPTQ's own layout, qweight (K/8, N): a program takes a K-range of
BN columns, and split-K programs meet through fp32 partials, a counter and the last program's sum. A 4-bit
4096x4096 layer (8.4 MB, ~3 us of bytes) takes ~10.5 us. Two ways to find out why, in one call:

1. Leave-one-out timings of today's kernel: without the LoRA, and without the act-order permutation (x given
   already permuted, so the kernel reads it contiguously).
2. Another design, defined here (it moves into the package only if it wins): a K-major copy of the packed
   weights, wt (N, K/8), each program owning BN whole columns over all of K. No split-K (no partials, no
   counter, no second pass), and every word of a program is independent of the others. The price: x is read
   by every program (8 KB, from L2), and the LoRA's x @ Aᵀ cannot be shared across programs, so it comes in
   precomputed as u (r,) and the kernel adds s * u @ B[n]ᵀ. Variants: the permutation inside the kernel
   (`perm`), or x given permuted (`xperm`); `full` times x[perm] and u = x @ Aᵀ as separate ops in the same
   graph, what a model would run.

3. "inplace": kernels/gemv_m1.py, GPTQ's own layout (or the act-order copy), with the codes masked in place
   inside a float's mantissa (one LOP3 and one FFMA per code: session 8's gemv1 trick), accumulated per
   (word row, column) without reshaping the codes or reducing across threads inside the loop, many warps
   per program. "today" is gemv.py's split-K kernel (GPTQLORA_GEMV_M1=split's path).
   Session 12's ncu run of today's kernel (4096x4096, 4 bit): 8.2 instructions per code, 1.9 warps per
   scheduler (12% occupancy, 127 registers), 0.40 instructions issued per cycle, the SMs busy 73% of the
   kernel: it is bound by issue at too few warps, and by its split-K tail. Session 8's gemv1 had the
   instruction count (3.9 per code) but one-warp-wide rows and 64-way split-K (a 128 KB tail per column
   block). Here SPLIT may be 1 (no partials at all) with up to 16 warps per program.

    python bench/gemv_m1_probe.py --json $OUT/m1.json [--kinds today,inplace]   (GPU; --budget-s caps it)
    TRITON_INTERPRET=1 python bench/gemv_m1_probe.py --small                     (CPU: correctness only)

Every candidate is checked against gemv_reference (fp32) first; timing as bench/gemv_sweep.py (CUDA graph, enough
layer copies that every call reads HBM), act-order layers (today's kernel through its repacked copy), bf16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.append(str(Path(__file__).parent))

from gemv_sweep import GROUP, R, Timer, packed_layer  # noqa: E402

from gptqlora.kernels import gemv as G  # noqa: E402
from gptqlora.kernels import gemv_m1  # noqa: E402
from gptqlora.kernels.dequant import _zeros_at  # noqa: E402
from gptqlora.kernels.gemv import _as_float  # noqa: E402

SHAPES = ((4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096))
SMALL = ((256, 128), (512, 96))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _kmajor_kernel(x_ptr, wt_ptr, zeros_ptr, scales_ptr, perm_ptr, u_ptr, b_ptr, out_ptr, K, N, R, lora_scale,
                   BITS: tl.constexpr, GROUP: tl.constexpr, FLOAT_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                   HAS_U: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, BR: tl.constexpr):
    """y[n] = Σ_k x[k] s (q[k, n] - z) (+ s_lora * u @ B[n]ᵀ) for BN columns n over all of K.

    wt (N, K/PER) int32: column n's packed rows in group order, PER = 32 / BITS codes a word. A chunk is NG
    groups of GW = GROUP / PER words per column, loaded as one (BN, NG, GW) tile; the zero is factored out of
    each group: s (Σ x q - z Σ x)."""
    PER: tl.constexpr = 32 // BITS
    GW: tl.constexpr = GROUP // PER  # words of one group in one column
    KW = K // PER
    n_groups = K // GROUP
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    mn = offs_n < N
    offs_w = tl.arange(0, GW)
    acc = tl.zeros((BN, NG), tl.float32)
    for g0 in range(0, n_groups, NG):
        offs_g = g0 + tl.arange(0, NG)
        mg = offs_g < n_groups
        widx = offs_g[:, None] * GW + offs_w[None, :]  # (NG, GW) word index along K
        m3 = mn[:, None, None] & mg[None, :, None]
        words = tl.load(wt_ptr + offs_n[:, None, None] * KW + widx[None, :, :], mask=m3, other=0)
        words = words.to(tl.uint32, bitcast=True)  # (BN, NG, GW)
        p = tl.zeros((BN, NG, GW), tl.float32)
        xs = tl.zeros((NG, GW), tl.float32)
        for j in tl.static_range(PER):  # code j of every word: rows widx * PER + j
            rows = widx * PER + j
            src = tl.load(perm_ptr + rows, mask=mg[:, None], other=0) if HAS_PERM else rows
            xj = tl.load(x_ptr + src, mask=mg[:, None], other=0).to(tl.float32)  # (NG, GW)
            q = (words >> (j * BITS)) & ((1 << BITS) - 1)
            p += _as_float(q) * xj[None, :, :]
            xs += xj
        m2 = mn[:, None] & mg[None, :]
        s = tl.load(scales_ptr + offs_g[None, :] * N + offs_n[:, None], mask=m2, other=0).to(tl.float32)  # (BN, NG)
        z = _zeros_at(zeros_ptr, offs_g[None, :], offs_n[:, None], m2, N, BITS, FLOAT_ZEROS)  # (BN, NG)
        acc += s * (tl.sum(p, axis=2) - z * tl.sum(xs, axis=1)[None, :])
    y = tl.sum(acc, axis=1)  # (BN,)
    if HAS_U:
        offs_r = tl.arange(0, BR)
        mr = offs_r < R
        u = tl.load(u_ptr + offs_r, mask=mr, other=0).to(tl.float32)  # (BR,)
        bt = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=mn[:, None] & mr[None, :], other=0)
        y += lora_scale * tl.sum(bt.to(tl.float32) * u[None, :], axis=1)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mn)


def inplace_gemv(x, zeros, scales, plan, bits, cfg, a=None, b=None, scaling=1.0):
    """x (1, K) -> (1, N): the package's one-token kernel (kernels/gemv_m1.py) at config `cfg`."""
    k, n = x.shape[1], plan.qweight.shape[1]
    return gemv_m1.gemv_m1(x, plan.qweight, zeros, scales, bits, plan, gemv_m1.legal_config(cfg, k, n, bits, None),
                           None if a is None else [a], None if b is None else [b], scaling)


def inplace_grid(bits: int, k: int, n: int, sms: int, small: bool, stages: tuple[int, ...] = (1,)) -> list[dict]:
    """NREP x word rows per tile x warps (warps <= BW) x the next tile's words prefetched or not, each at a
    split for ~2 or 4 programs per SM (session 12 call 2: 4 x 4 x 4 won at 4 bit, 2 x 8 x 4 at 2 bit).
    `stages` beyond 1: the same without the register prefetch but with the loop's loads staged through
    shared memory (gemv_m1's loop_stages), also at ~1 program per SM (longer loops for the pipeline)."""
    if small:
        return [dict(NREP=1, BW=4, num_warps=4, SPLIT=3, PREFETCH=1), dict(NREP=2, BW=8, num_warps=2, SPLIT=1, PREFETCH=0)] + \
            [dict(NREP=1, BW=4, num_warps=4, SPLIT=2, PREFETCH=0, loop_stages=st) for st in stages if st > 1]
    out = []
    # NREP 8 only without the register prefetch: with the warps on the word rows (session 13) it spends the
    # fewest loop instructions per code (offline sm_90 SASS: 3.2-3.4 at 2 bit, 4.1-4.3 at 4 bit, no spill)
    for nrep, bw, w, pre in itertools.product((2, 4, 8), (4, 8), (4, 8), (0, 1)):
        if w > bw or (nrep == 8 and pre):
            continue
        for per_sm in (2, 4):
            out.append(dict(NREP=nrep, BW=bw, num_warps=w, PREFETCH=pre,
                            SPLIT=max(1, round(per_sm * sms / -(-n // (128 * nrep))))))
        for st in (st for st in stages if st > 1 and not pre):
            for per_sm in (1, 2):
                out.append(dict(NREP=nrep, BW=bw, num_warps=w, PREFETCH=0, loop_stages=st,
                                SPLIT=max(1, round(per_sm * sms / -(-n // (128 * nrep))))))
    return out


def kmajor_copy(plan: G.GemvPlan) -> torch.Tensor:
    """wt (N, K/PER): the plan's packed rows (group order) transposed, one column's words contiguous."""
    return plan.qweight.t().contiguous()


def kmajor_gemv(x, wt, zeros, scales, perm, bits, group, cfg, u=None, b=None, scaling=1.0):
    """x (1, K) -> (1, N). perm: x column of each packed row (None: x is given in row order already)."""
    k = x.shape[1]
    n = wt.shape[0]
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    ng = max(1, min(cfg["NG"], triton.next_power_of_2(k // group)))
    _kmajor_kernel[(triton.cdiv(n, cfg["BN"]),)](
        x, wt, zeros, scales, perm if perm is not None else wt, u if u is not None else x,
        b if b is not None else x, out, k, n, b.shape[1] if b is not None else 1, float(scaling),
        BITS=bits, GROUP=group, FLOAT_ZEROS=zeros.is_floating_point(), HAS_PERM=perm is not None,
        HAS_U=u is not None, BN=cfg["BN"], NG=ng, BR=16, num_warps=cfg["num_warps"])
    return out


def kmajor_grid(bits: int, small: bool) -> list[dict]:
    if small:
        return [dict(BN=4, NG=2, num_warps=4)]
    gw = GROUP[bits] * bits // 32  # words per group and column
    # words per column per chunk: 128 or 512 (4096 rows at 4 bit is 512 words: one chunk)
    return [dict(BN=bn, NG=max(1, cw // gw), num_warps=w)
            for bn, cw, w in itertools.product((2, 4, 8), (128, 512), (2, 4, 8))]


def _small_layer(k, n, bits, gs, device):
    """A small act-order layer with group `gs`."""
    from gptqlora.formats.gptq import pack_cols, pack_rows

    g = torch.Generator(device=device).manual_seed(k * n + bits)
    codes = torch.randint(0, 2**bits, (k, n), dtype=torch.int32, generator=g, device=device)
    zeros = torch.randint(0, 2**bits, (k // gs, n), dtype=torch.int32, generator=g, device=device)
    scales = (torch.rand(k // gs, n, generator=g, device=device) * 0.01 + 1e-3).half()
    g_idx = (torch.arange(k, device=device, dtype=torch.int32) // gs)[torch.randperm(k, generator=g, device=device)]
    return pack_rows(codes, bits), pack_cols(zeros, bits), scales, g_idx


def probe_shape(k, n, bits, timer, l2_bytes, small, deadline, device, kinds=("kmajor", "inplace"),
                stages: tuple[int, ...] = (1,)) -> list[dict]:
    gs = 32 if small else GROUP[bits]
    packed_bytes = k * n * bits / 8 + (k // gs) * n * (2 + bits / 8) + 4 * k + 2 * R * (k + n)
    copies = 1 if small else max(1, math.ceil(l2_bytes / packed_bytes))
    layers = [_small_layer(k, n, bits, gs, device) if small else packed_layer(k, n, bits, device, s)
              for s in range(copies)]
    plans = [G.plan_gemv(p[0], p[3], bits, gs, True) for p in layers]
    wts = [kmajor_copy(pl) for pl in plans]
    g = torch.Generator(device=device).manual_seed(k + n + bits)
    x = torch.randn(1, k, device=device, generator=g, dtype=torch.bfloat16)
    a = torch.randn(R, k, device=device, generator=g, dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, R, device=device, generator=g, dtype=torch.bfloat16) * 0.05
    want_lora = G.gemv_reference(x, *layers[0], bits, a, b, 2.0).float()
    want_base = G.gemv_reference(x, *layers[0], bits).float()
    perms = [pl.perm.long() for pl in plans]  # the same map for every copy would be unrealistic: one each
    sms = G._sm_count(device)
    today_cfg = G.pick_config(1, k, n, bits, plans[0], sms)

    def noperm(pl):  # today's kernel reading x contiguously (x given permuted): the same copy, no perm
        return G.GemvPlan(pl.qweight, None, True, pl.group, pl.locks)

    def run(kind, cfg, i):
        layer, plan, wt, perm = layers[i], plans[i], wts[i], perms[i]
        if kind == "today":  # config given: gemv.py's kernel, never gemv_m1
            return G.gemv_triton(x, *layer, bits, plan, a, b, 2.0, config=today_cfg)
        if kind == "today-nolora":
            return G.gemv_triton(x, *layer, bits, plan, config=today_cfg)
        if kind == "today-noperm-nolora":
            return G.gemv_triton(x[:, perm], *layer, bits, noperm(plan), config=today_cfg)
        if kind == "kmajor-perm":
            return kmajor_gemv(x, wt, layer[1], layer[2], plan.perm, bits, gs, cfg)
        if kind == "kmajor-xperm":  # x permuted outside (timed as a separate op)
            return kmajor_gemv(x[:, perm], wt, layer[1], layer[2], None, bits, gs, cfg)
        if kind == "kmajor-full":  # + u = x @ Aᵀ outside, added in the kernel
            u = (x @ a.t()).float()
            return kmajor_gemv(x[:, perm], wt, layer[1], layer[2], None, bits, gs, cfg, u, b, 2.0)
        if kind == "inplace":
            return inplace_gemv(x, layer[1], layer[2], plan, bits, cfg, a, b, 2.0)
        if kind == "inplace-nolora":
            return inplace_gemv(x, layer[1], layer[2], plan, bits, cfg)
        raise ValueError(kind)

    def measure(kind, cfg) -> dict:
        want = want_lora if kind in ("today", "kmajor-full", "inplace") else want_base
        try:
            y = run(kind, cfg, 0).float()
            err = float((y - want).norm() / want.norm())
            if not err < 2e-2:
                return {"kind": kind, "cfg": cfg, "us": math.inf, "err": err}
            us = timer.us(lambda: [run(kind, cfg, i) for i in range(copies)]) / copies
            return {"kind": kind, "cfg": cfg, "us": us, "err": err}
        except Exception as e:  # noqa: BLE001 - out of resources etc.: not a candidate
            return {"kind": kind, "cfg": cfg, "us": math.inf, "error": f"{type(e).__name__}: {str(e)[:160]}"}

    tried = [measure("today", today_cfg), measure("today-nolora", today_cfg),
             measure("today-noperm-nolora", today_cfg)]
    for design, grid, extra in (("kmajor", kmajor_grid(bits, small), ("kmajor-perm", "kmajor-full")),
                                ("inplace", inplace_grid(bits, k, n, sms, small, stages), ("inplace-nolora",))):
        if design not in kinds:
            continue
        first = "kmajor-xperm" if design == "kmajor" else "inplace"
        for cfg in grid:
            if time.time() > deadline:
                break
            tried.append(measure(first, cfg))
        best = min((t for t in tried if t["kind"] == first), key=lambda t: t["us"], default=None)
        if best is not None and math.isfinite(best["us"]):
            tried += [measure(kind, best["cfg"]) for kind in extra]
    dense = [torch.randn(k, n, device=device, dtype=torch.bfloat16)
             for _ in range(1 if small else max(1, math.ceil(l2_bytes / (2 * k * n))))]
    t_bf16 = timer.us(lambda: [x @ w for w in dense]) / len(dense)
    today_us = tried[0]["us"]
    rows = []
    for kind in dict.fromkeys(t["kind"] for t in tried):
        mine = [t for t in tried if t["kind"] == kind]
        best = min(mine, key=lambda t: t["us"])
        errs = [t.get("error") for t in mine if t.get("error")]
        wrong = [t for t in mine if "err" in t and not t["err"] < 2e-2]
        gbps = packed_bytes / best["us"] / 1e3 if math.isfinite(best["us"]) and best["us"] > 0 else 0.0
        rows.append({"shape": f"{k}x{n}", "bits": bits, "kind": kind, "us": round(best["us"], 2),
                     "x_today": round(today_us / best["us"], 2) if best["us"] > 0 else None,
                     "x_bf16": round(t_bf16 / best["us"], 2) if best["us"] > 0 else None,
                     "bf16_us": round(t_bf16, 2), "gbps": round(gbps), "err": best.get("err"),
                     "cfg": best["cfg"], "tried": len(mine), "failed": len(errs), "wrong": len(wrong),
                     "first_error": errs[0] if errs else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ncu_run(path: str, device) -> int:
    """For `ncu`: today's kernel (also with its loop's loads staged, loop_stages 2) and the best K-major and
    in-place configs of `path` at 4096x4096 and 4096x22016, 4 bit, each launched twice (the first compiles)."""
    rows = json.loads(Path(path).read_text())["rows"]
    for k, n in ((4096, 4096), (4096, 22016)):
        best = [r for r in rows if r["shape"] == f"{k}x{n}" and r["bits"] == 4 and r["kind"] == "kmajor-xperm"]
        layer = packed_layer(k, n, 4, device, 0)
        plan = G.plan_gemv(layer[0], layer[3], 4, 128, True)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        a = torch.randn(R, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, R, device=device, dtype=torch.bfloat16)
        today = G.pick_config(1, k, n, 4, plan)
        for cfg in (today, {**today, "loop_stages": 2}):
            for _ in range(2):
                G.gemv_triton(x, *layer, 4, plan, a, b, 2.0, config=cfg)
        if best and math.isfinite(best[0]["us"]):
            wt = kmajor_copy(plan)
            for _ in range(2):
                kmajor_gemv(x, wt, layer[1], layer[2], None, 4, 128, best[0]["cfg"])
        best = [r for r in rows if r["shape"] == f"{k}x{n}" and r["bits"] == 4 and r["kind"] == "inplace"]
        if best and math.isfinite(best[0]["us"]):
            for _ in range(2):
                inplace_gemv(x, layer[1], layer[2], plan, 4, best[0]["cfg"], a, b, 2.0)
    torch.cuda.synchronize()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--small", action="store_true", help="CPU interpreter shapes (correctness only)")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--ncu-run", metavar="JSON", help="launch the kernels once for ncu (see ncu_run)")
    ap.add_argument("--shapes", help="comma-separated KxN (default: all of SHAPES)")
    ap.add_argument("--kinds", default="kmajor,inplace", help="designs beside today's: kmajor, inplace")
    ap.add_argument("--loop-stages", default="1", help="comma-separated: in-place configs with the loop's loads "
                    "staged (gemv_m1's loop_stages) beside the register-prefetch ones, e.g. 1,3")
    ap.add_argument("--table", help="write the shipped gemv table plus the best in-place configs ('m1,...' keys): "
                                    "GPTQLORA_GEMV_CONFIGS=PATH makes decoding use them")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.ncu_run:
        return ncu_run(args.ncu_run, device)
    timer = Timer(device.type == "cuda")
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    deadline = time.time() + args.budget_s
    rows = []
    for bits in [int(v) for v in args.bits.split(",")]:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")] if args.shapes else \
            SMALL if args.small else SHAPES
        for k, n in shapes:
            rows += probe_shape(k, n, bits, timer, 2 * l2, args.small, deadline, device, args.kinds.split(","),
                                tuple(int(v) for v in args.loop_stages.split(",")))
    bad = [r for r in rows if not math.isfinite(r["us"]) or r["wrong"]]
    print(f"{len(rows)} rows, {len(bad)} with no correct candidate or a wrong one")
    if args.table:
        table = G.load_table(G.TUNED_FILE) if G.TUNED_FILE.exists() else {}
        for r in rows:
            if r["kind"] == "inplace" and math.isfinite(r["us"]):
                k, n = map(int, r["shape"].split("x"))
                table[gemv_m1.tuned_key(r["bits"], k, n)] = {f: r["cfg"][f] for f in gemv_m1.TUNABLE if f in r["cfg"]}
        Path(args.table).write_text(json.dumps({"configs": table}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                               "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
