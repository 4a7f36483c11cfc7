"""Kernel benchmark: one quantized linear (Triton dequant + cuBLAS) against a bf16 matmul, same run.

    python bench/kernel_bench.py [--quick] [--json OUT.json]
    python bench/kernel_bench.py --graph --tokens 2048     # GPU time only: every call inside a CUDA graph

For each shape (K x N) and token count M, times in bf16:
  peer   x @ W (forward) and forward + dx = dy @ Wᵀ (what a frozen base costs in LoRA training);
  ours   quant_matmul forward and forward + backward at 2/3/4/8 bit (group 128; act-order g_idx), through
         the grouped dequant kernel, as QuantLinear runs it;
  dequant alone, as achieved bandwidth (packed bytes read + bf16 bytes written) against the card's copy
  bandwidth measured in the same run, for the grouped and the gather kernel, and a sweep of block sizes.
Median of `triton.testing.do_bench`; the packed layers rotate so that repeated runs do not hit L2.
--graph times the forward and forward + backward inside a CUDA graph (`do_bench_cudagraph`) over enough
copies of the layer (and of the peer's bf16 W) that every call reads from HBM: the GPU's time without the
host's launch cost, which is what a compiled training step pays (eager timing at 2048 tokens is host-bound
for the 4096x4096 shapes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton

from gptqlora.formats.gptq import pack_cols, pack_rows
from gptqlora.kernels.autograd import quant_matmul
from gptqlora.kernels.dequant import dequantize_triton, plan_for
from gptqlora.kernels.reference import dequantize

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 22016))
TOKENS = (2048, 16384)
BITS = (2, 3, 4, 8)
GROUP = 128


def packed_layer(k: int, n: int, bits: int, device) -> tuple:
    g = torch.Generator(device=device).manual_seed(k * n + bits)
    codes = torch.randint(0, 2**bits, (k, n), device=device, dtype=torch.int32, generator=g)
    zeros = torch.randint(0, 2**bits, (k // GROUP, n), device=device, dtype=torch.int32, generator=g)
    scales = (torch.rand(k // GROUP, n, device=device, generator=g) * 0.01 + 1e-3).half()
    g_idx = (torch.arange(k, device=device, dtype=torch.int32) // GROUP)[torch.randperm(k, device=device,
                                                                                      generator=g)]
    return pack_rows(codes, bits), pack_cols(zeros, bits), scales, g_idx


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


FLUSH_BYTES = 256 * 2**20  # the --graph mode's copies of a layer add up to more than this (H200 L2: 60 MB)


def graph_ms(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def graph_rows(k: int, n: int, bits: int, tokens, device) -> list[dict]:
    """Forward and forward + dx of ours and of the bf16 peer, each inside a CUDA graph, over `copies` layers
    (more bytes than L2 holds), per layer."""
    copies = max(3, math.ceil(FLUSH_BYTES / (k * n * bits / 8)))
    layers = [packed_layer(k, n, bits, device) for _ in range(copies)]
    plans = [plan_for(lay[3], GROUP) for lay in layers]
    check(layers, plans, bits)  # the kernels equal the reference at this shape before their timings count
    dense = [torch.randn(k, n, device=device, dtype=torch.bfloat16)
             for _ in range(max(3, math.ceil(FLUSH_BYTES / (2 * k * n))))]
    out = []
    for m in tokens:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        row = {"shape": f"{k}x{n}", "tokens": m, "bits": bits, "copies": copies}
        for name, fn, count in (
                ("bf16_fwd_ms", lambda: [x @ w for w in dense], len(dense)),
                ("bf16_fwd_bwd_ms", lambda: [torch.autograd.grad(x @ w, x, dy) for w in dense], len(dense)),
                ("fwd_ms", lambda: [quant_matmul(x, *lay, bits, "triton", pl) for lay, pl in zip(layers, plans)], copies),
                ("fwd_bwd_ms", lambda: [torch.autograd.grad(quant_matmul(x, *lay, bits, "triton", pl), x, dy)
                                        for lay, pl in zip(layers, plans)], copies)):
            try:
                row[name] = graph_ms(fn) / count
            except Exception as e:  # noqa: BLE001 - reported: e.g. an op that cannot be captured
                row[name] = None
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
        for part in ("fwd", "fwd_bwd"):
            ours, peer = row[f"{part}_ms"], row[f"bf16_{part}_ms"]
            row[f"{part}_ratio"] = ours / peer if ours and peer else None
        out.append(row)
        del x, dy
    return out


def copy_bandwidth(device) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written."""
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = ms(lambda: b.copy_(a))
    return 2 * a.numel() / t / 1e6


def check(layers, plans, bits) -> None:
    """Both kernels equal the reference at this real shape before any of their timings count."""
    want = dequantize(*layers[0], bits, torch.bfloat16)
    if plans[0] is None:
        raise SystemExit(f"no grouped-kernel plan for an act-order layer at {tuple(want.shape)}")
    for plan in (plans[0], None):  # grouped, then gather
        if not torch.equal(dequantize_triton(*layers[0], bits, torch.bfloat16, plan=plan), want):
            raise SystemExit(f"dequant kernel differs from the reference at {tuple(want.shape)}, {bits} bit")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096x11008 only, 4 and 2 bit")
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--graph", action="store_true", help="GPU time only: forward and fwd+bwd inside CUDA graphs")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    a = ap.parse_args()
    device = torch.device("cuda")
    tokens = [int(t) for t in a.tokens.split(",")]
    shapes, bits_list = (((4096, 11008),), (2, 4)) if a.quick else (SHAPES, BITS)
    if a.graph:
        rows = [r for k, n in shapes for bits in bits_list for r in graph_rows(k, n, bits, tokens, device)]
        out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "triton": triton.__version__, "timing": "cuda graph", "rows": rows}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
        print(f"{out['device']}  torch {out['torch']}  triton {out['triton']}  {out['date']}  (CUDA-graph timed)")
        print("| shape | tokens | bits | bf16 fwd ms | ours fwd ms | x | bf16 fwd+bwd ms | ours fwd+bwd ms | x |")
        print("|---|---|---|---|---|---|---|---|---|")
        f = lambda v, d=3: "failed" if v is None else f"{v:.{d}f}"  # noqa: E731
        for r in rows:
            print(f"| {r['shape']} | {r['tokens']} | {r['bits']} | {f(r['bf16_fwd_ms'])} | {f(r['fwd_ms'])} | "
                  f"{f(r['fwd_ratio'], 2)} | {f(r['bf16_fwd_bwd_ms'])} | {f(r['fwd_bwd_ms'])} | {f(r['fwd_bwd_ratio'], 2)} |")
        errs = {k: v for r in rows for k, v in r.items() if k.endswith("_error")}
        if errs:
            print("errors:", errs)
        return 0
    copy_gbs = copy_bandwidth(device)
    rows, sweep = [], []
    for k, n in shapes:
        for bits in bits_list:
            layers = [packed_layer(k, n, bits, device) for _ in range(3)]
            plans = [plan_for(lay[3], GROUP) for lay in layers]
            check(layers, plans, bits)
            w_out = torch.empty(k, n, dtype=torch.bfloat16, device=device)
            it = iter(range(10**9))

            def pick():  # rotate through three layers so that repeated runs do not hit L2
                i = next(it) % 3
                return layers[i], plans[i]

            def dq(**kw):
                lay, plan = pick()
                return dequantize_triton(*lay, bits, out=w_out, plan=plan, **kw)

            nbytes = sum(t.numel() * t.element_size() for t in layers[0]) + w_out.numel() * 2
            t_dq = ms(dq)
            t_gather = ms(lambda: dequantize_triton(*pick()[0], bits, out=w_out))
            if (k, n) == (4096, 11008):
                for bk, bn, nw in ((8, 256, 4), (16, 128, 4), (16, 256, 4), (16, 512, 4), (16, 512, 8),
                                   (32, 256, 4), (32, 256, 8), (32, 512, 8)):
                    t = ms(lambda: dq(block_k=bk, block_n=bn, num_warps=nw))
                    sweep.append({"bits": bits, "block_k": bk, "block_n": bn, "num_warps": nw,
                                  "us": round(t * 1e3, 1), "GB/s": round(nbytes / t / 1e6)})
            for m in tokens:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
                dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
                w = torch.randn(k, n, device=device, dtype=torch.bfloat16)
                peer_f = ms(lambda: x @ w)
                peer_fb = ms(lambda: torch.autograd.grad(x @ w, x, dy))

                def qm():
                    lay, plan = pick()
                    return quant_matmul(x, *lay, bits, "triton", plan)

                ours_f = ms(qm)
                ours_fb = ms(lambda: torch.autograd.grad(qm(), x, dy))
                rows.append({"shape": f"{k}x{n}", "tokens": m, "bits": bits, "bf16_fwd_ms": peer_f,
                             "bf16_fwd_bwd_ms": peer_fb, "fwd_ms": ours_f, "fwd_bwd_ms": ours_fb,
                             "fwd_ratio": ours_f / peer_f, "fwd_bwd_ratio": ours_fb / peer_fb,
                             "dequant_us": t_dq * 1e3, "dequant_GBs": nbytes / t_dq / 1e6,
                             "gather_us": t_gather * 1e3,
                             "bf16_TFLOPs": 2 * m * k * n / peer_f / 1e9})
                del x, dy, w
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "triton": triton.__version__, "copy_GBs": copy_gbs, "rows": rows, "dequant_block_sweep": sweep}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    p = sys.stdout.write
    p(f"{out['device']}  torch {out['torch']}  triton {out['triton']}  {out['date']}  copy {copy_gbs:.0f} GB/s\n")
    p(f"{'shape':>11} {'M':>6} {'b':>2} | {'bf16 f':>7} {'ours f':>7} {'x':>5} | {'bf16 fb':>7} {'ours fb':>7} "
      f"{'x':>5} | {'dq us':>6} {'dq GB/s':>7} {'gath us':>7} | {'bf16 TF/s':>9}\n")
    for r in rows:
        p(f"{r['shape']:>11} {r['tokens']:>6} {r['bits']:>2} | {r['bf16_fwd_ms']:7.3f} {r['fwd_ms']:7.3f} "
          f"{r['fwd_ratio']:5.2f} | {r['bf16_fwd_bwd_ms']:7.3f} {r['fwd_bwd_ms']:7.3f} {r['fwd_bwd_ratio']:5.2f} | "
          f"{r['dequant_us']:6.1f} {r['dequant_GBs']:7.0f} {r['gather_us']:7.1f} | {r['bf16_TFLOPs']:9.0f}\n")
    for s in sweep:
        p(f"dequant 4096x11008 {s['bits']}b BK={s['block_k']:<3} BN={s['block_n']:<3} warps={s['num_warps']}: "
          f"{s['us']:7.1f} us {s['GB/s']:6d} GB/s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
