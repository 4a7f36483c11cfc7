"""Probe: two other designs for the decode kernel at M = 2..16 (batch decode), timed beside today's.

Today's M > 1 path (kernels/gemv.py, BM = 16) runs x (16, BK) @ codes (BK, BN) on the tensor cores. Per
layer it takes the same time at 2 bit as at 4 bit (session 10 sweep: 26.8 / 27.0 us at 4096x4096, M = 8,
twice the bf16 matmul's 13.4 us): the cost is per code, not per byte. Two candidates:

- "fma": the same kernel with BM = 8 on the FMA units (broadcast and sum, as M = 1 does), no conversion of
  the codes into a tensor-core operand layout;
- "swap": the product transposed, y^T (BN, 16) = codes^T (BN, BK) @ x^T (BK, 16), so the unpacked codes are the
  tensor cores' first operand (Marlin's orientation; on Hopper the first operand may stay in registers) and the
  16-row operand is x. Defined here, not in the package: it moves there only if it wins.

    python bench/gemv_m8_probe.py --json $OUT/m8_probe.json       (H200: ~4 min; --budget-s caps it)
    TRITON_INTERPRET=1 python bench/gemv_m8_probe.py --small     (CPU: correctness of both, small shapes)

Each candidate is checked against gemv_reference (fp32) before it is timed; timing as bench/gemv_sweep.py
(CUDA graph, enough layer copies that every call reads HBM), with an r = 8 LoRA fused, act-order through the
repacked copy, bf16 activations.
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
from gptqlora.kernels.dequant import _zeros_at  # noqa: E402
from gptqlora.kernels.gemv import _as_float  # noqa: E402
from gptqlora.kernels.split_k import _store_split  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
SMALL = ((256, 128), (384, 128))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr):
    """a (P, Q) fp32 holding values exact in b's dtype, b (Q, S) -> fp32 (P, S) on the tensor cores."""
    if F32_DOT:  # the interpreter gets bf16 dots wrong
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit(do_not_specialize=["M", "SPLIT"])
def _swap_kernel(x_ptr, qweight_ptr, zeros_ptr, scales_ptr, perm_ptr, a_ptr, b_ptr, out_ptr, part_ptr, lock_ptr,
                 M, K, N, QW_STRIDE, R, GROUP, lora_scale, SPLIT,
                 BITS: tl.constexpr, FLOAT_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_LORA: tl.constexpr,
                 SPLIT_K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                 F32_DOT: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mm, mn = offs_m < M, offs_n < N
    span = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
    k_start = pid_k * span
    k_end = tl.minimum(K, k_start + span)
    PER: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // PER
    shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
    acc = tl.zeros((BN, BM), tl.float32)  # y^T
    offs_r = tl.arange(0, BR)
    mr = offs_r < R
    xa = tl.zeros((BR, BM), tl.float32)  # (x_c A_c^T)^T
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < k_end
        w_rows = k0 // PER + tl.arange(0, BKW)
        mw = mn[:, None] & (w_rows < k_end // PER)[None, :]
        words = tl.load(qweight_ptr + w_rows[None, :] * QW_STRIDE + offs_n[:, None], mask=mw, other=0)  # (BN, BKW)
        words = words.to(tl.uint32, bitcast=True)
        q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # (BN, BKW, PER)
        wq = _as_float(tl.reshape(q, (BN, BK)))  # column w * PER + j is row k0 + w * PER + j
        src = tl.load(perm_ptr + offs_k, mask=mk, other=0) if HAS_PERM else offs_k
        xt = tl.load(x_ptr + offs_m[None, :] * K + src[:, None], mask=mk[:, None] & mm[None, :], other=0)  # (BK, BM)
        g = k0 // GROUP
        s = tl.load(scales_ptr + g * N + offs_n, mask=mn, other=0).to(tl.float32)  # (BN,)
        z = _zeros_at(zeros_ptr, g, offs_n, mn, N, BITS, FLOAT_ZEROS)  # (BN,)
        p = _dot(wq, xt, F32_DOT)  # (BN, BM)
        xs = tl.sum(xt.to(tl.float32), axis=0)  # (BM,)
        acc += s[:, None] * (p - z[:, None] * xs[None, :])
        if HAS_LORA:
            if HAS_PERM:
                xl = tl.load(x_ptr + offs_m[None, :] * K + offs_k[:, None], mask=mk[:, None] & mm[None, :], other=0)
            else:
                xl = xt
            at = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0)
            xa += _dot(at.to(tl.float32), xl, F32_DOT)  # (BR, BM)
    if HAS_LORA:
        bt = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=mn[:, None] & mr[None, :], other=0)  # (BN, BR)
        acc += lora_scale * _dot(bt.to(tl.float32), xa.to(x_ptr.dtype.element_ty), F32_DOT)
    _store_split(tl.trans(acc), out_ptr, part_ptr, lock_ptr, pid_n, pid_k, offs_m, offs_n, mm[:, None] & mn[None, :],
                 M, N, SPLIT, SPLIT_K, BM, BN)


def swap_gemv(x, qweight, zeros, scales, g_idx, bits, plan, a, b, scaling, cfg):
    m, k = x.shape
    n = qweight.shape[1]
    split = cfg["SPLIT"]
    bk = min(cfg["BK"], plan.group)
    split = triton.cdiv(k, triton.cdiv(triton.cdiv(k, split), bk) * bk)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    qw = plan.qweight
    perm = plan.perm if plan.perm is not None else g_idx
    grid = (triton.cdiv(n, cfg["BN"]), split)
    _swap_kernel[grid](x, qw, zeros, scales, perm, a, b, out, part, plan.locks, m, k, n, qw.stride(0), b.shape[1],
                       plan.group, float(scaling), split, BITS=bits, FLOAT_ZEROS=zeros.is_floating_point(),
                       HAS_PERM=plan.perm is not None, HAS_LORA=True, SPLIT_K=split > 1, BM=16, BK=bk, BN=cfg["BN"],
                       BR=16, F32_DOT=INTERPRET, num_warps=cfg["num_warps"], num_stages=3)
    return out


def candidates(kind: str, m: int, small: bool) -> list[dict]:
    if small:
        return [dict(BN=32, BK=32, num_warps=4, **({"BM": 8} if kind == "fma" else {}))]
    if kind == "fma":
        return [dict(BM=8, BN=bn, BK=bk, num_warps=w) for bn, bk, w in itertools.product((64, 128, 256), (16, 32), (2, 4))]
    return [dict(BN=bn, BK=bk, num_warps=w) for bn, bk, w in itertools.product((64, 128), (64, 128), (4, 8))]


def probe_shape(k, n, bits, ms, timer, l2_bytes, small, deadline, device) -> list[dict]:
    gs = GROUP[bits] if not small else 32
    packed_bytes = k * n * bits / 8 + (k // gs) * n * (2 + bits / 8) + 4 * k + 2 * R * (k + n)
    copies = 1 if small else max(1, math.ceil(l2_bytes / packed_bytes))
    layers = [_small_layer(k, n, bits, gs, device) if small else packed_layer(k, n, bits, device, s) for s in range(copies)]
    plans = [G.plan_gemv(p[0], p[3], bits, gs, True) for p in layers]
    rows = []
    for m in ms:
        g = torch.Generator(device=device).manual_seed(k + n + bits + m)
        x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
        a = torch.randn(R, k, device=device, generator=g, dtype=torch.bfloat16) * 0.05
        b = torch.randn(n, R, device=device, generator=g, dtype=torch.bfloat16) * 0.05
        want = G.gemv_reference(x, *layers[0], bits, a, b, 2.0).float()
        sms = G._sm_count(device)

        def run(kind, cfg, layer, plan):  # "today" and "fma" are the package kernel, "fma" with BM = 8
            if kind == "swap":
                return swap_gemv(x, *layer, bits, plan, a, b, 2.0, cfg)
            return G.gemv_triton(x, *layer, bits, plan, a, b, 2.0, config=cfg)

        def measure(kind, cfg) -> dict:
            try:
                y = run(kind, cfg, layers[0], plans[0]).float()
                err = float((y - want).norm() / want.norm())
                if err > 2e-2 or not math.isfinite(err):
                    return {"kind": kind, "cfg": cfg, "us": math.inf, "err": err}
                us = timer.us(lambda: [run(kind, cfg, p, pl) for p, pl in zip(layers, plans)]) / copies
                return {"kind": kind, "cfg": cfg, "us": us, "err": err}
            except Exception as e:  # noqa: BLE001 - out of resources etc.: not a candidate
                return {"kind": kind, "cfg": cfg, "us": math.inf, "error": f"{type(e).__name__}: {str(e)[:120]}"}

        today_cfg = G.pick_config(m, k, n, bits, plans[0], sms)
        today = measure("today", {**today_cfg})
        tried = [today]
        programs = 4 * sms
        for kind in ("fma", "swap") if m <= 8 else ("swap",):
            for cfg in candidates(kind, m, small):
                for per_sm in (2, 4):
                    if time.time() > deadline:
                        break
                    split = max(1, min(64, round(per_sm * sms / -(-n // cfg["BN"]))))
                    tried.append(measure(kind, {**cfg, "SPLIT": split}))
        dense = [torch.randn(k, n, device=device, dtype=torch.bfloat16) for _ in range(1 if small else max(1, math.ceil(l2_bytes / (2 * k * n))))]
        t_bf16 = timer.us(lambda: [x @ w for w in dense]) / len(dense)
        for kind in ("today", "fma", "swap"):
            mine = [t for t in tried if t["kind"] == kind]
            if not mine:
                continue
            best = min(mine, key=lambda t: t["us"])
            errs = [t.get("error") for t in mine if t.get("error")]
            rows.append({"shape": f"{k}x{n}", "bits": bits, "m": m, "kind": kind, "best_us": round(best["us"], 1),
                         "x_today": round(today["us"] / best["us"], 2) if best["us"] > 0 else None,
                         "x_bf16": round(t_bf16 / best["us"], 2) if best["us"] > 0 else None,
                         "bf16_us": round(t_bf16, 1), "err": best.get("err"), "best": best["cfg"],
                         "tried": len(mine), "failed": len(errs), "first_error": errs[0] if errs else None})
            print(rows[-1], flush=True)
    return rows


def _small_layer(k, n, bits, gs, device):
    """A small layer with group `gs` (packed_layer uses the 7B groups)."""
    from gptqlora.formats.gptq import pack_cols, pack_rows

    g = torch.Generator(device=device).manual_seed(k * n)
    codes = torch.randint(0, 2**bits, (k, n), dtype=torch.int32, generator=g, device=device)
    zeros = torch.randint(0, 2**bits, (k // gs, n), dtype=torch.int32, generator=g, device=device)
    scales = (torch.rand(k // gs, n, generator=g, device=device) * 0.01 + 1e-3).half()
    g_idx = (torch.arange(k, device=device, dtype=torch.int32) // gs)[torch.randperm(k, generator=g, device=device)]
    return pack_rows(codes, bits), pack_cols(zeros, bits), scales, g_idx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--m", default="1,8,16")
    ap.add_argument("--small", action="store_true", help="CPU interpreter shapes (correctness only)")
    ap.add_argument("--budget-s", type=float, default=300)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = Timer(device.type == "cuda")
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    deadline = time.time() + args.budget_s
    rows = []
    ms = [int(v) for v in args.m.split(",")]
    for bits in [int(b) for b in args.bits.split(",")]:
        for k, n in SMALL if args.small else SHAPES:
            rows += probe_shape(k, n, bits, ms, timer, 2 * l2, args.small, deadline, device)
    bad = [r for r in rows if not math.isfinite(r["best_us"])]
    print(f"{len(rows)} rows, {len(bad)} with no correct candidate")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                               "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
