"""GPU check: the 3.994-bit SpQR mix's layers (4-bit g64, 3-bit g128; session 25) through the decode kernels.

The tensor-core SpQR path (kernels/gemv_mma.py, `SpQRLinear.mma_plan`) was checked on the GPU only at 3-bit codes in
groups of 16 (`gemv_mma_probe.py --quick --spqr`); the mix has 4-bit codes in groups of 64 and 3-bit ones in groups
of 128 (the CPU test emulates their plan: tests/kernels/test_gemv_mma.py). Here each 7B shape at both settings,
M = 1 and 8, with and without an r = 8 adapter: `small_m` (the kernel) against x @ dequantize() in fp32 (outliers
included) + the adapter. Prints one JSON line a case and a summary; exit status 1 if any is off.

    python bench/spqr_mix_check.py            (GPU)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).parent))

from spqr import spqr_layer  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
SETTINGS = ((4, 64), (3, 128))
TOL = 1e-2  # relative error in the bf16 output, as the probe's SpQR checks


def main() -> int:
    device = torch.device("cuda")
    bad = total = 0
    for (k, n), (bits, group) in ((s, g) for s in SHAPES for g in SETTINGS):
        layer = spqr_layer(k, n, bits, group=group, outliers=1e-4, device=device,
                           scale=1.0 / (math.sqrt(k) * 2 ** (bits - 1)), seed=1)
        plan = layer.mma_plan()
        w = layer.dequantize(torch.float32)  # (K, N), outliers in
        gen = torch.Generator(device=device).manual_seed(k + n)
        a = torch.randn(8, k, device=device, generator=gen) / math.sqrt(k)
        b = torch.randn(n, 8, device=device, generator=gen) * 0.05
        for m in (1, 8):
            x = torch.randn(m, k, device=device, generator=gen).bfloat16()
            for lora in (False, True):
                with torch.no_grad():
                    y = layer.small_m(x, a if lora else None, b if lora else None, 2.0)
                want = x.float() @ w + (2.0 * (x.float() @ a.t()) @ b.t() if lora else 0)
                err = float((y.float() - want).norm() / want.norm()) if y is not None else float("nan")
                ok = y is not None and err < TOL
                bad += not ok
                total += 1
                print(json.dumps(dict(shape=f"{k}x{n}", bits=bits, group=group, m=m, lora=lora,
                                      path="tensor-core" if plan is not None else "triton",
                                      rel_err=round(err, 6), ok=ok)), flush=True)
    print(f"spqr mix checks: {total - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
