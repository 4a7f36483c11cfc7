"""GemLite (github.com/dropbox/gemlite: Triton low-bit matmuls, 1/2/4/8 bit with groups and zeros) as a peer of
our decode kernel, on the same GPTQ layers, in one process: is it the well-kept library that decodes faster?

    python bench/gemlite_peer.py [--json OUT.json]        (GPU; gemlite travels as a wheel in .whl/)

Our kernel is issue-bound at ~8 instructions per code (docs/benchmarks.md, decode, session 4); GemLite's GEMV
kernels are reported 3-6x faster than torchao's at decoding. For each 7B layer shape, 4 and 2 bit (group
128 / 64, act-order), M = 1 and 8, bf16, it times:

- ours: `gemv_triton` (the tuned table), no LoRA;
- GemLite: `GemLiteLinear` packed from the same codes. GPTQ's W[k, n] = (q - z) s is HQQ's
  (W_q - zeros) * scales with W_q = qᵀ. GemLite has no act-order map, so it gets the rows in group order
  (our repacked copy) and x permuted: timed with the permutation (what a model would run) and without;
- bf16 `x @ W`.

Every call reads from HBM (layer copies rotate through more than L2 holds), inside a CUDA graph. Each
GemLite output is checked against the fp32 torch reference first (relative error printed); a failing one
is not timed. Not yet run on a GPU (written in session 4, after its device time was spent).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
spec = importlib.util.spec_from_file_location("gemv_sweep", _BENCH / "gemv_sweep.py")
gemv_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gemv_sweep)

from gptqlora.formats.gptq import unpack_cols, unpack_rows  # noqa: E402
from gptqlora.kernels.gemv import gemv_reference, gemv_triton, plan_gemv  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
GROUP = {2: 64, 4: 128}
L2 = 256 * 2**20


def hqq_weights(p, plan, bits: int, group: int, dtype):
    """Layer p as HQQ/GemLite weights, rows in group order (plan.qweight is the repacked copy of an act-order
    layer): W_q (N, K) uint8, scales and zeros (N, K / group), with (W_q - zeros) * scales = Wᵀ[:, perm]."""
    _, zeros, scales, _ = p
    k, n = plan.qweight.shape[0] * 32 // bits, plan.qweight.shape[1]
    codes = unpack_rows(plan.qweight, bits)[:k]  # (K, N), row r in group r // group
    z = unpack_cols(zeros, bits)[:, :n]  # (G, N)
    return (codes.t().contiguous().to(torch.uint8), scales.t().contiguous().to(dtype),
            z.t().contiguous().to(dtype))


def gemlite_layer(p, plan, bits: int, group: int, dtype):
    from gemlite import DType, GemLiteLinear

    w_q, s, z = hqq_weights(p, plan, bits, group, dtype)
    layer = GemLiteLinear(bits, group_size=group, in_features=w_q.shape[1], out_features=w_q.shape[0],
                          input_dtype=DType.BF16, output_dtype=DType.BF16)
    layer.pack(w_q, s, z, None)
    return layer


def us(fn) -> float:
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.stderr.write("bench/gemlite_peer.py needs a CUDA GPU\n")
        return 2
    import gemlite

    dev, dtype = torch.device("cuda"), torch.bfloat16
    rows, t0 = [], time.time()
    for (k, n), bits in [(s, b) for b in (4, 2) for s in SHAPES]:
        group = GROUP[bits]
        nbytes = k * n * bits / 8 + (k // group) * n * (2 + bits / 8)
        copies = max(1, math.ceil(L2 / nbytes))
        layers = [gemv_sweep.packed_layer(k, n, bits, dev, s) for s in range(copies)]
        plans = [plan_gemv(p[0], p[3], bits, group, True) for p in layers]
        gls = [gemlite_layer(p, pl, bits, group, dtype) for p, pl in zip(layers, plans)]
        dense = [torch.randn(k, n, device=dev, dtype=dtype) for _ in range(max(1, math.ceil(L2 / (2 * k * n))))]
        for m in (1, 8):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            ref = gemv_reference(x, *layers[0], bits).float()
            perm = plans[0].perm.long()
            err = float((gls[0](x[:, perm]).float() - ref).norm() / ref.norm())
            row = {"shape": f"{k}x{n}", "bits": bits, "m": m, "gemlite_rel_err": round(err, 5),
                   "ours_us": round(us(lambda: [gemv_triton(x, *p, bits, pl) for p, pl in zip(layers, plans)]) / copies, 1),
                   "bf16_us": round(us(lambda: [x @ w for w in dense]) / len(dense), 1)}
            if err < 2e-2:
                row["gemlite_us"] = round(us(lambda: [g(x[:, pl.perm]) for g, pl in zip(gls, plans)]) / copies, 1)
                xp = x[:, perm]
                row["gemlite_no_perm_us"] = round(us(lambda: [g(xp) for g in gls]) / copies, 1)
                row["gemlite_x_ours"] = round(row["ours_us"] / row["gemlite_us"], 2)
            rows.append(row)
            print(row, flush=True)
        del layers, plans, gls, dense
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "gemlite": getattr(gemlite, "__version__", "?"), "wall_s": round(time.time() - t0), "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    cols = ["shape", "bits", "m", "ours_us", "gemlite_us", "gemlite_no_perm_us", "bf16_us", "gemlite_x_ours",
            "gemlite_rel_err"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
