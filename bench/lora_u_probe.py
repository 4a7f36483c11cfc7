"""kernels/lora_u.py's u = x Aᵀ on the GPU: its variants against each other and cuBLAS, M = 1..16 (issue 16).

Session 20's profile of the 7B at batch 8 (H100): lora_u took 1.43 of the step's 7.7 ms, ~16 us a call, against
3.4 us at M = 1. This times each variant (`mode` 1: products summed elementwise, one reduction at the end; 2:
tensor cores, M and r padded to 16, fp32 A as two bf16 halves; session 20's run also had mode 0, the (M, r) tile
reduced every k-step, removed since) over
rows a program (`kc`) and warps, per sibling group of the 7B (q|k|v: 3 A's of K = 4096; gate|up: 2; o_proj: 1;
down_proj: 1 of K = 11008), A fp32 (PEFT's default) and bf16, graph-timed over copies of A so each call reads
HBM. Every variant is checked against lora_u_reference first; a wrong one is reported, not timed.

    python bench/lora_u_probe.py --json $OUT/lora_u.json [--budget-s 120]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).parent))

from gemv_sweep import Timer  # noqa: E402

from gptqlora.kernels.lora_u import lora_u, lora_u_reference  # noqa: E402
from gptqlora.kernels.lora_u import pick as lora_u_pick  # noqa: E402

GROUPS = (("q|k|v", 3, 4096), ("gate|up", 2, 4096), ("o_proj", 1, 4096), ("down_proj", 1, 11008))
VARIANTS = ([dict(mode=1, kc=kc, warps=w, bk=None) for kc, w in itertools.product((512, 256, 128), (2, 4))]
            + [dict(mode=2, kc=kc, warps=w, bk=bk)
               for kc, w, bk in itertools.product((512, 256, 128), (2, 4), (None, 64))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--ms", default="8,1,16,4,2")  # M = 8 first: the batch-8 step's case
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    device = torch.device("cuda")
    timer, t0, rows = Timer(True), time.time(), []
    copies = 16  # 16 sets of A: 16 x 3 x 8 x 4096 x 4 bytes = 6 MB for q|k|v, read from HBM per replay, not L2
    locks = torch.zeros(64, dtype=torch.int32, device=device)
    for dtype, (name, p, k), m in itertools.product((torch.float32, torch.bfloat16), GROUPS,
                                                    [int(v) for v in args.ms.split(",")]):
        if time.time() - t0 > args.budget_s:
            print(f"budget spent: stopped before {dtype} {name} M={m}", flush=True)
            break
        g = torch.Generator(device=device).manual_seed(m * k + p)
        x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
        a = [[(torch.randn(args.rank, k, device=device, generator=g) * 0.05).to(dtype) for _ in range(p)]
             for _ in range(copies)]
        want = lora_u_reference(x, a[0])
        res = {}
        for v in VARIANTS:
            key = f"m{v['mode']} kc{v['kc']} w{v['warps']}" + (f" bk{v['bk']}" if v["bk"] else "")
            try:
                err = float((lora_u(x, a[0], locks, **v) - want).abs().max() / want.abs().max())
                us = timer.us(lambda v=v: [lora_u(x, a[i], locks, **v) for i in range(copies)]) / copies \
                    if err < 1e-3 else math.inf
            except Exception as e:  # noqa: BLE001 - report and go on
                err, us = f"{type(e).__name__}: {str(e)[:120]}", math.inf
            res[key] = (round(us, 2), err if isinstance(err, str) else float(f"{err:.2e}"))
        ok = {kk: vv[0] for kk, vv in res.items() if math.isfinite(vv[0])}
        best = min(ok, key=ok.get) if ok else None
        cublas = timer.us(lambda: [[x @ t.to(x.dtype).t() for t in a[i]] for i in range(copies)]) / copies
        row = {"a_dtype": str(dtype).removeprefix("torch."), "group": name, "projections": p, "k": k, "m": m,
               "picked_us": res[f"m{lora_u_pick(m)['mode']} kc{lora_u_pick(m)['kc']} w{lora_u_pick(m)['warps']}"][0], "best": best, "best_us": ok.get(best),
               "best_per_mode": {md: min(((vv, kk) for kk, vv in ok.items() if kk.startswith(f"m{md} ")), default=None)
                                 for md in (1, 2)},
               "cublas_16bit_us": round(cublas, 2),
               "wrong": {kk: vv[1] for kk, vv in res.items() if not math.isfinite(vv[0])}, "all": res}
        rows.append(row)
        print(json.dumps({kk: vv for kk, vv in row.items() if kk != "all"}), flush=True)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    assert not locks.any(), "lora_u left a counter set"


if __name__ == "__main__":
    main()
