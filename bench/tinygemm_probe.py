"""One decode-size GPTQ layer three ways, graph-timed in one run: our small-M Triton kernel (kernels/gemv.py),
PyTorch's int4 kernel through bench/tinygemm_peer.py, and the bf16 `x @ W` they must beat (issue 16).

    python bench/tinygemm_probe.py --json $OUT/tinygemm_probe.json        (H200: ~1-2 min)

Per 7B shape (q/k/v/o 4096x4096, gate/up 4096x11008, down 11008x4096, and q|k|v and gate|up as one
launch each: 4096x12288, 4096x22016), bit width (--bits) and token count (--ms), act-order, r=8 LoRA:
- `ours`: gemv_triton with its tuned table (LoRA fused), act-order through the repacked copy;
- `tiny`: tinygemm alone and `tiny+lora` with the two LoRA matmuls beside it, x read through perm;
  2 and 3 bit ride in tinygemm's 4-bit field (twice a 2-bit layer's bytes);
- `bf16`: x @ W, W dense bf16.
First each candidate's output is compared with the fp32 reference (gemv_reference: relative error
printed; over 2e-2 the row says so and is not timed). Each time is a CUDA graph's replay
(triton.testing.do_bench_cudagraph) over enough copies of the layer that every call reads HBM, not L2,
divided by the copies. Also the copy bandwidth (read + write) in the same run, and `inner_k_tiles` 2/4/8
for tinygemm on the first shape.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from gptqlora.kernels import gemv as G

sys.path.insert(0, str(Path(__file__).parent))
from gemv_sweep import GROUP, Timer, packed_layer  # noqa: E402
from tinygemm_peer import plan_tinygemm, tinygemm_matmul  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016))
R = 8
L2 = 256 * 2**20


def rel(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def probe(k, n, bits, ms, device, timer, copy_gbps, inner=(8,)) -> list[dict]:
    gs = GROUP[bits]
    packed_bytes = k * n * bits / 8 + (k // gs) * n * (2 + bits / 8)
    copies = max(2, math.ceil(L2 / packed_bytes))
    layers = [packed_layer(k, n, bits, device, s) for s in range(copies)]
    plans = [G.plan_gemv(p[0], p[3], bits, gs, True) for p in layers]
    tiny = {t: [plan_tinygemm(*p, bits, gs, t) for p in layers] for t in inner}
    g = torch.Generator(device=device).manual_seed(k + n + bits)
    a = torch.randn(R, k, device=device, generator=g, dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, R, device=device, generator=g, dtype=torch.bfloat16) * 0.05
    dense = [torch.randn(k, n, device=device, dtype=torch.bfloat16) for _ in range(max(2, math.ceil(L2 / (2 * k * n))))]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
        ref = G.gemv_reference(x.float(), *layers[0], bits, a.float(), b.float(), 2.0).float()
        ref0 = G.gemv_reference(x.float(), *layers[0], bits).float()
        t_bf16 = timer.us(lambda: [x @ w for w in dense]) / len(dense)
        cands = {"ours+lora": (lambda p, pl: G.gemv_triton(x, *p, bits, pl, a, b, 2.0), plans, ref),
                 "ours": (lambda p, pl: G.gemv_triton(x, *p, bits, pl), plans, ref0)}
        for t in inner:
            suffix = "" if t == 8 else f" ikt{t}"
            cands["tiny" + suffix] = (lambda p, tp: tinygemm_matmul(x, tp.packed, tp.scale_zeros, tp.perm, tp.group),
                                      tiny[t], ref0)
            if t == 8:
                cands["tiny+lora"] = (lambda p, tp: tinygemm_matmul(x, tp.packed, tp.scale_zeros, tp.perm, tp.group,
                                                                    a, b, 2.0), tiny[t], ref)
        for name, (fn, ps, want) in cands.items():
            row = {"shape": f"{k}x{n}", "bits": bits, "m": m, "kernel": name, "bf16_us": round(t_bf16, 1)}
            try:
                err = rel(fn(layers[0], ps[0]), want)
                row["rel_err"] = float(f"{err:.2e}")
                if err > 2e-2:
                    row["note"] = "wrong: not timed"
                else:
                    us = timer.us(lambda: [fn(p, pl) for p, pl in zip(layers, ps)]) / copies
                    gbps = packed_bytes / us / 1e3
                    row.update(us=round(us, 1), x_bf16=round(t_bf16 / us, 2), gbps=round(gbps),
                               pct_copy=round(100 * gbps / copy_gbps, 1))
            except Exception as e:  # noqa: BLE001 - a kernel that refuses a shape is a row, not a crash
                row["note"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
            print(row, flush=True)
    del layers, plans, tiny, dense
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--budget-s", type=float, default=150, help="start no shape after this many seconds")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.stderr.write("tinygemm_probe.py needs a CUDA device (tinygemm is CUDA-only; the CPU tests check the conversion)\n")
        return 2
    device = torch.device("cuda")
    t0 = time.time()
    timer = Timer(True)
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * 2**30 / timer.us(lambda: dst.copy_(src)) / 1e3
    del src, dst
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: copy {copy_gbps:.0f} GB/s (read + write)", flush=True)
    ms = [int(m) for m in a.ms.split(",")]
    rows = []
    for i, bits in enumerate(int(b) for b in a.bits.split(",")):
        for j, (k, n) in enumerate(SHAPES):
            if time.time() - t0 > a.budget_s:
                rows.append({"shape": f"{k}x{n}", "bits": bits, "note": "skipped: over --budget-s"})
                continue
            rows += probe(k, n, bits, ms, device, timer, copy_gbps, inner=(8, 4, 2) if i == j == 0 else (8,))
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "copy_gbps": round(copy_gbps), "wall_s": round(time.time() - t0), "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    cols = ["shape", "bits", "m", "kernel", "us", "bf16_us", "x_bf16", "pct_copy", "rel_err", "note"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
