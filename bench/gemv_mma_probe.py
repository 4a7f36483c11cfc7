"""The tensor-core decode kernel (kernels/gemv_mma.py) on the GPU: correctness first, then per-layer timings
against the Triton decode path and bf16 in the same run (issue 16).

1. Checks against gemv_reference (fp32): 2 and 4 bit, M = 1, 5, 8, 11, 16, act-order and plain rows, bf16 and
   fp16 x, groups 32 / 64 / 128 / one per layer, LoRA fp32 r=8, bf16 r=16 or none, siblings side by side
   (each projection's adapter), the 7B shapes; the split-K counters left zero; a CUDA-graph replay with new
   inputs equal to an eager call.
2. Timings, graph-timed over enough layer copies that each call reads HBM (as bench/gemv_sweep.py): per 7B
   shape, bits and M in (1, 8): the kernel at its picked block and a small grid of others, the Triton
   path as decoding runs it today (kernels/gemv_m1.py at M = 1, gemv.py above), and bf16 `x @ W`.

    python bench/gemv_mma_probe.py --json $OUT/mma.json [--budget-s 240] [--skip-timing]
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

sys.path.append(str(Path(__file__).parent))

from gemv_sweep import GROUP, R, Timer, packed_layer  # noqa: E402

from gptqlora.kernels import gemv as G  # noqa: E402
from gptqlora.kernels import gemv_m1, gemv_mma  # noqa: E402
from gptqlora.kernels.lora_u import lora_u  # noqa: E402

SHAPES = ((4096, 4096, None), (4096, 12288, (4096, 8192)), (4096, 22016, (11008, 22016)), (11008, 4096, None))


def rel(y, want) -> float:
    return float((y.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def checks(device, quick: bool = False) -> dict:
    out = {"passed": 0, "failed": []}

    def record(name: str, ok: bool, err, **extra) -> None:  # a check's outcome; a failure printed at once
        if ok:
            out["passed"] += 1
        else:
            out["failed"].append({"case": name, "err": err, **extra})
            print("FAIL", name, err, *extra.values(), flush=True)

    def case(name, k, n, bits, gs, act, m, dtype, lora, bounds=None):
        p = packed_layer(k, n, bits, device, hash((k, n, bits, gs, act, m)) % 10**6, gs, act)
        plan = G.plan_gemv(p[0], p[3], bits, gs, True, mma=True)
        g = torch.Generator(device=device).manual_seed(m + k)
        x = torch.randn(m, k, device=device, generator=g).to(dtype)
        widths = [n] if bounds is None else [bounds[0], bounds[1] - bounds[0], n - bounds[1]]
        widths = [w for w in widths if w > 0]
        a = b = None
        if lora:
            ldt, r = (torch.float32, 8) if lora == "f32" else (dtype, 16)
            a = [(torch.randn(r, k, device=device, generator=g) * 0.05).to(ldt) for _ in widths]
            b = [(torch.randn(w, r, device=device, generator=g) * 0.05).to(ldt) for w in widths]
        try:
            ran = plan.qweight.dim() == 4 and gemv_mma.takes(x, p[2], a or [], b or [])
            zeros = gemv_mma.slot_zeros(p[1], bits, n) if plan.qweight.dim() == 4 else p[1]  # 3 bit: in 4-bit slots
            y = G.gemv_triton(x, p[0], zeros, *p[2:], bits, plan, a if a is None or bounds else a[0],
                              b if b is None or bounds else b[0], 2.0, bounds=bounds)
            want = G.gemv_reference(x, *p, bits).float()
            if a is not None:
                edges = [0] + list(torch.tensor(widths).cumsum(0).tolist())
                for i, (ai, bi) in enumerate(zip(a, b)):
                    want[:, edges[i]:edges[i + 1]] += 2.0 * (x.float() @ ai.float().t()) @ bi.float().t()
            err = rel(y, want)
            locks = int(plan.locks.abs().sum())
            ok = ran and err < 1e-2 and locks == 0
        except Exception as e:  # noqa: BLE001
            ok, err, locks, ran = False, f"{type(e).__name__}: {str(e)[:300]}", -1, False
        record(name, ok, err, locks=locks, ran_mma=ran)

    for bits in (4, 2):
        gs = GROUP[bits]
        for m in ((1, 8, 11) if quick else (1, 5, 8, 11, 16)):
            for act in (True, False):
                for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)):
                    case(f"{bits}b m{m} act{int(act)} {dtype} f32-lora", 1024, 768, bits, gs, act, m, dtype, "f32")
            case(f"{bits}b m{m} nolora", 1024, 768, bits, gs, True, m, torch.bfloat16, None)
            case(f"{bits}b m{m} bf16-lora r16", 1024, 768, bits, gs, True, m, torch.bfloat16, "same")
            case(f"{bits}b m{m} siblings", 1024, 768, bits, gs, True, m, torch.bfloat16, "f32", (256, 512))
            case(f"{bits}b m{m} two siblings", 1024, 512, bits, gs, True, m, torch.bfloat16, "f32", (256, 512))
        for gsx in (32, 256, 1024):
            case(f"{bits}b g{gsx}", 1024, 256, bits, gsx, True, 1, torch.bfloat16, "f32")
        for k, n, bounds in SHAPES[:2] if quick else SHAPES:
            for m in (1, 8):
                case(f"{bits}b {k}x{n} m{m}", k, n, bits, gs, True, m, torch.bfloat16, "f32", bounds)
    # 3-bit GPTQ layers in 4-bit slots (session 20): codes and zeros repacked, the 4-bit kernel
    for k, n, bounds in ((1024, 768, None),) + SHAPES[1:3]:
        for m in (1, 8, 16):
            case(f"3b {k}x{n} m{m}", k, n, 3, GROUP[3], True, m, torch.bfloat16, "f32", bounds)
    # SpQR layers (3-bit g16 codes in 4-bit slots, decoded statistics, 1% outliers in the same launch), the
    # statistics staged in shared memory (SSTATS 1, 256-row splits), their raw values staged (SSTATS 2) and in
    # registers (SSTATS 0, 128-row)
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("bench_spqr", Path(__file__).with_name("spqr.py"))
    bench_spqr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_spqr)
    os.environ[gemv_mma.ENV] = "1"
    try:
        def spqr_case(name, lay, w, k, n, m, lora):
            g = torch.Generator(device=device).manual_seed(k + m)
            x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
            a = (torch.randn(8, k, device=device, generator=g) * 0.05) if lora else None
            b = (torch.randn(n, 8, device=device, generator=g) * 0.05) if lora else None
            try:
                with torch.no_grad():
                    y = lay.small_m(x, a, b, 2.0)
                want = x.float() @ w + (2.0 * (x.float() @ a.t()) @ b.t() if lora else 0)
                err = rel(y, want)
                ok = lay.mma_plan() is not None and err < 1e-2 and not lay.mma_locks.any()
            except Exception as e:  # noqa: BLE001
                ok, err = False, f"{type(e).__name__}: {str(e)[:300]}"
            record(name, ok, err)

        cases = ((1, True), (8, False), (16, True))
        for k, n in ((1024, 768), (4096, 4096)) if quick else ((1024, 768), (4096, 4096), (11008, 4096), (4096, 11008)):
            for bits in (3,) if quick else (3, 4, 2):
                lay = bench_spqr.spqr_layer(k, n, bits, device=device)
                w = lay.dequantize(torch.float32)
                for (m, lora), (sstats, opre) in itertools.product(cases, ("10", "00", "20", "21")):
                    os.environ[gemv_mma.SSTATS_ENV], os.environ[gemv_mma.OPRE_ENV] = sstats, opre
                    spqr_case(f"spqr{bits} {k}x{n} m{m} lora{int(lora)} sstats{sstats} opre{opre}", lay, w, k, n, m,
                              lora)
        # session 25's 4.0-bit mixes (docs/results.md section 3): 4-bit codes in groups of 64, 3-bit in groups of
        # 128, statistics groups of 16 or 64, ~0.01% outliers; the shipped statistics path
        for name in (gemv_mma.SSTATS_ENV, gemv_mma.OPRE_ENV):
            os.environ.pop(name, None)
        for k, n in ((1024, 768), (4096, 4096)) if quick else ((1024, 768), (4096, 4096), (11008, 4096), (4096, 11008)):
            for bits, group, stat_group in ((4, 64, 16), (3, 128, 16), (4, 64, 64)):
                lay = bench_spqr.spqr_layer(k, n, bits, group=group, stat_group=stat_group, outliers=1e-4,
                                            device=device)
                w = lay.dequantize(torch.float32)
                for m, lora in cases:
                    spqr_case(f"spqr{bits} g{group} s{stat_group} {k}x{n} m{m} lora{int(lora)}", lay, w, k, n, m,
                              lora)
        # SpQR siblings (q|k|v-like 3 x 1024, gate|up-like 2 x 2048) in one launch (nn/spqr_siblings.py): each
        # sibling's output equal to its own launch's (the sums differ only by the split of K: same KC, same order)
        from gptqlora.nn import spqr_siblings

        os.environ[spqr_siblings.ENV] = "1"
        for name in (gemv_mma.SSTATS_ENV, gemv_mma.OPRE_ENV):  # the shipped statistics path
            os.environ.pop(name, None)
        for widths in ((1024, 1024, 1024), (2048, 2048)):
            lays = [bench_spqr.spqr_layer(1024, n, 3, device=device, seed=i) for i, n in enumerate(widths)]
            for lay in lays[1:]:
                lay.g_idx.copy_(lays[0].g_idx)  # one row order, as siblings quantized on one input have
            for m in (1, 8, 16):
                g = torch.Generator(device=device).manual_seed(m)
                x = torch.randn(m, 1024, device=device, generator=g).to(torch.bfloat16)
                a = [torch.randn(8, 1024, device=device, generator=g) * 0.05 for _ in lays]
                b = [torch.randn(n, 8, device=device, generator=g) * 0.05 for n in widths]
                name = f"spqr siblings {widths} m{m}"
                try:
                    with torch.no_grad():
                        ys = spqr_siblings.decode_group(lays, x, a, b, 2.0)
                        want = [lay.small_m(x, ai, bi, 2.0) for lay, ai, bi in zip(lays, a, b)]
                    err = None if ys is None else max(rel(y, w.float()) for y, w in zip(ys, want))
                    ok = err is not None and err < 1e-2 and not lays[0].group_locks.any()
                except Exception as e:  # noqa: BLE001
                    ok, err = False, f"{type(e).__name__}: {str(e)[:300]}"
                record(name, ok, err)
    finally:
        for name in (gemv_mma.ENV, gemv_mma.SSTATS_ENV, gemv_mma.OPRE_ENV, "GPTQLORA_SPQR_SIBLINGS"):
            os.environ.pop(name, None)
    # the last split's sum, 4 cells a thread at once (TAIL 1) against one (TAIL 0), and the launch overlapping
    # lora_u's (PDL 1): the same sums in the same order, so the same bits
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for k, n, bounds in SHAPES:
        p = packed_layer(k, n, 4, device, 7, GROUP[4])
        plan = G.plan_gemv(p[0], p[3], 4, GROUP[4], True, mma=True)
        widths = [n] if bounds is None else [bounds[0], bounds[1] - bounds[0], n - bounds[1]]
        widths = [w for w in widths if w > 0]  # gate|up: two projections (session 21: its tail checks passed three)
        for m in (8, 16, 5):
            g = torch.Generator(device=device).manual_seed(k + n + m)
            x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
            a = [torch.randn(R, k, device=device, generator=g) * 0.05 for _ in widths]
            b = [torch.randn(w, R, device=device, generator=g) * 0.05 for w in widths]
            cfg = gemv_mma.pick_config(m, k, n, 4, GROUP[4], sms, bounds)
            try:
                y = [gemv_mma.gemv_mma(x, plan.qweight, p[1], p[2], 4, GROUP[4], plan.perm, plan.locks, a, b, 2.0,
                                       bounds, sms, dict(cfg, TAIL=t, PDL=d)) for t, d in ((0, 0), (1, 0), (0, 1))]
                ok = torch.equal(y[0], y[1]) and torch.equal(y[0], y[2]) and not plan.locks.any()
                err = float((y[0].float() - y[1].float()).abs().max())
            except Exception as e:  # noqa: BLE001
                ok, err = False, f"{type(e).__name__}: {str(e)[:300]}"
            record(f"tail {k}x{n} m{m}", ok, err)
    # a CUDA graph replays it with new inputs
    p = packed_layer(4096, 4096, 4, device, 1, 128)
    plan = G.plan_gemv(p[0], p[3], 4, 128, True, mma=True)
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    G.gemv_triton(x, *p, 4, plan)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.gemv_triton(x, *p, 4, plan)
    x.copy_(torch.randn_like(x))
    graph.replay()
    err = rel(y, G.gemv_triton(x, *p, 4, plan))
    if err == 0.0:
        out["passed"] += 1
    else:
        out["failed"].append({"case": "graph replay", "err": err})
    return out


def timings(device, timer, deadline, quick: bool = False, ms: tuple[int, ...] = (1, 8),
            order: tuple[int, ...] = ()) -> list[dict]:
    rows = []
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    sms = G._sm_count(device)
    for bits in (4,) if quick else (4, 2):
        gs = GROUP[bits]
        # quick: the two shapes of the earlier calls first, then q|k|v and down_proj while the budget lasts
        # (session 18: the 7B through the tensor-core kernel lost ~2.5 ms a token where those two explain ~0.9)
        shapes = [SHAPES[i] for i in order] if order else (SHAPES[0], SHAPES[2], SHAPES[1], SHAPES[3]) if quick else SHAPES
        for k, n, bounds in shapes:
            if time.time() > deadline:
                rows.append({"shape": f"{k}x{n}", "bits": bits, "skipped": "budget"})
                continue
            nbytes = k * n * bits / 8 + (k // gs) * n * (2 + bits / 8)
            copies = max(2, math.ceil(3 * l2 / nbytes))
            layers = [packed_layer(k, n, bits, device, s) for s in range(copies)]
            tri = [G.plan_gemv(p[0], p[3], bits, gs, True) for p in layers]
            mma = [G.plan_gemv(p[0], p[3], bits, gs, True, mma=True) for p in layers]
            dense = [torch.randn(k, n, device=device, dtype=torch.bfloat16)
                     for _ in range(max(2, math.ceil(3 * l2 / (2 * k * n))))]
            for m in ms:
                g = torch.Generator(device=device).manual_seed(k + n + m)
                x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
                widths = [n] if bounds is None else [bounds[0], bounds[1] - bounds[0], n - bounds[1]]
                widths = [w for w in widths if w > 0]
                a = [torch.randn(R, k, device=device, generator=g) * 0.05 for _ in widths]
                b = [torch.randn(w, R, device=device, generator=g) * 0.05 for w in widths]
                la, lb = (a, b) if bounds else (a[0], b[0])
                want = G.gemv_triton(x, *layers[0], bits, tri[0], la, lb, 2.0, bounds=bounds).float()
                t_tri = timer.us(lambda: [G.gemv_triton(x, *layers[i], bits, tri[i], la, lb, 2.0, bounds=bounds)
                                          for i in range(copies)]) / copies
                t_bf16 = timer.us(lambda: [x @ w for w in dense]) / len(dense)
                # without the adapter (session 17: its share was 26 of the tensor-core kernel's 55 us at 4096x22016);
                # one projection (siblings without adapters never share a launch: sibling_gemv.decode_group)
                t_tri_bare = timer.us(lambda: [G.gemv_triton(x, *layers[i], bits, tri[i])
                                               for i in range(copies)]) / copies
                os.environ[gemv_m1.U_ENV] = "1"  # the Triton path with u computed once per call (lora_u.py)
                try:
                    t_tri_u = timer.us(lambda: [G.gemv_triton(x, *layers[i], bits, tri[i], la, lb, 2.0, bounds=bounds)
                                                for i in range(copies)]) / copies
                finally:
                    os.environ.pop(gemv_m1.U_ENV, None)

                def mma_run(i, cfg, adapter=True):  # copy i of the layer through the tensor-core kernel
                    return gemv_mma.gemv_mma(x, mma[i].qweight, layers[i][1], layers[i][2], bits, gs, mma[i].perm,
                                             mma[i].locks, a if adapter else [], b if adapter else [], 2.0,
                                             bounds if adapter else None, sms, cfg)

                def mma_us(cfg, adapter=True):  # us a call, over the copies
                    return timer.us(lambda: [mma_run(i, cfg, adapter) for i in range(copies)]) / copies

                picked = gemv_mma.pick_config(m, k, n, bits, gs, sms, bounds)
                grid = [picked] + [dict(WARPS=w, NT=nt, KC=kc, NM=picked["NM"], UPRE=picked["UPRE"])
                                   for w in (4, 8) for nt in (1, 2) for kc in (128 * (4 // bits), 256 * (4 // bits),
                                                                                512 * (4 // bits))
                                   if nt * kc // gemv_mma.rows_per_load(bits) <= 8 and k % kc == 0
                                   and (bounds is None or (bounds[0] % (w * nt * 16) == 0 and bounds[1] % (w * nt * 16) == 0))]
                best = None
                for cfg in grid:
                    if time.time() > deadline and best is not None:
                        break
                    try:
                        err = rel(mma_run(0, cfg), want)
                        us = mma_us(cfg) if err < 1e-2 else math.inf
                    except Exception as e:  # noqa: BLE001
                        err, us = f"{type(e).__name__}: {str(e)[:200]}", math.inf
                    if cfg is picked:
                        picked_us = us
                    if best is None or us < best[0]:
                        best = (us, cfg, err)
                bare = gemv_mma.pick_config(m, k, n, bits, gs, sms)
                t_mma_bare = mma_us(bare, adapter=False)
                # picked's block with each block's share of u (0, session 16's way) and u once per call, u Bᵀ added where
                # the cells are stored (1: the last split's sum); a wrong result: inf
                upre, upre_err = {}, {}
                for u in (0, 1):
                    cfg_u = dict(picked, UPRE=u)
                    upre_err[u] = rel(mma_run(0, cfg_u), want)
                    upre[u] = math.inf if upre_err[u] >= 1e-2 else picked_us if cfg_u == picked else mma_us(cfg_u)
                # session 20's A/Bs, both settings explicit (whichever the module's default is): the last split summing
                # a cell at a time (TAIL 0) or 4 at once, with the adapter and without; the launch after lora_u's (PDL 0)
                # or overlapping it
                t_tail = {tl: mma_us(dict(picked, TAIL=tl)) for tl in (0, 1)}
                t_tail_bare = {tl: mma_us(dict(bare, TAIL=tl), adapter=False) for tl in (0, 1)}
                t_pdl = [mma_us(dict(picked, PDL=d)) for d in (0, 1)]
                # u = x Aᵀ alone (session 19: the tensor-core kernel's adapter costs ~16 us at M = 8, 4096x22016)
                t_u = timer.us(lambda: [lora_u(x, a, mma[i].locks) for i in range(copies)]) / copies
                row = {"shape": f"{k}x{n}", "bits": bits, "m": m, "mma_picked_us": round(picked_us, 2),
                       "lora_u_us": round(t_u, 2),
                       "picked_upre": picked["UPRE"], "mma_adapter_in_blocks_us": round(upre[0], 2),
                       "mma_u_once_us": round(upre[1], 2),
                       "upre_err": [round(upre_err[u], 5) for u in (0, 1)],
                       "mma_no_adapter_us": round(t_mma_bare, 2),
                       "mma_tail_us": [round(t_tail[0], 2), round(t_tail[1], 2)],
                       "mma_pdl_us": [round(t_pdl[0], 2), round(t_pdl[1], 2)],
                       "mma_no_adapter_tail_us": [round(t_tail_bare[0], 2), round(t_tail_bare[1], 2)],
                       "triton_no_adapter_us": round(t_tri_bare, 2),
                       "triton_u_once_us": round(t_tri_u, 2),
                       "mma_best_us": round(best[0], 2), "best_cfg": best[1], "err": best[2],
                       "triton_us": round(t_tri, 2), "bf16_us": round(t_bf16, 2),
                       "x_triton": round(t_tri / best[0], 2), "x_bf16": round(t_bf16 / best[0], 2),
                       "gbps": round(nbytes / best[0] / 1e3)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            del layers, tri, mma, dense
            torch.cuda.empty_cache()
    return rows


def spqr_timings(device, timer, deadline, ms: tuple[int, ...] = (1, 8)) -> list[dict]:
    """SpQR layers (3-bit g16, statistics 3-bit g16, 1% outliers; bench/spqr.py's random layer) at the 7B's
    unfused shapes, per call with the r = 8 adapter: SpQR's Triton path (its default), the tensor-core kernel
    (GPTQLORA_GEMV_MMA=1), the same without outliers (the dense part alone) and without the adapter; the
    picked block. Session 21 measured the kernel slower than the default on the 7B (0.44x against 0.56x bf16)
    without saying which part costs: this splits it. `mma_reg_us`: the statistics in registers (SSTATS 0, at most
    8 groups a split: 128 rows), session 21's kernel; `mma_raw_us` stages the block's raw values and decodes from
    shared memory (SSTATS 2), `mma_raw_opre_us` also reads the outliers' offsets and first entries before the
    block's barrier (OPRE 1); the others stage decoded values in shared memory (256 rows)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_spqr", Path(__file__).with_name("spqr.py"))
    bench_spqr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_spqr)
    rows = []
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
        if time.time() > deadline:
            rows.append({"spqr_shape": f"{k}x{n}", "skipped": "budget"})
            continue
        copies = max(2, math.ceil(3 * l2 / (k * n * 0.55)))  # ~4.4 bits a weight read: past L2 each call
        layers = {o: [bench_spqr.spqr_layer(k, n, 3, outliers=o, device=device, seed=i) for i in range(copies)]
                  for o in (0.01, 0.0)}
        dense = [torch.randn(k, n, device=device, dtype=torch.bfloat16) for _ in range(max(2, math.ceil(3 * l2 / (2 * k * n))))]
        for m in ms:
            g = torch.Generator(device=device).manual_seed(k + n + m)
            x = torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16)
            a = torch.randn(R, k, device=device, generator=g) * 0.05
            b = torch.randn(n, R, device=device, generator=g) * 0.05

            def us(lays, mma: bool, adapter: bool = True, sstats: str = "1", opre: str = "0") -> float:
                os.environ[gemv_mma.ENV] = "1" if mma else "0"
                os.environ[gemv_mma.SSTATS_ENV], os.environ[gemv_mma.OPRE_ENV] = sstats, opre
                try:
                    with torch.no_grad():
                        for lay in lays:  # plans built outside the timing; None would time nothing
                            assert lay.small_m(x, a if adapter else None, b if adapter else None, 2.0) is not None
                        return timer.us(lambda: [lay.small_m(x, a if adapter else None, b if adapter else None, 2.0)
                                                 for lay in lays]) / len(lays)
                finally:
                    for name in (gemv_mma.ENV, gemv_mma.SSTATS_ENV, gemv_mma.OPRE_ENV):
                        os.environ.pop(name, None)

            cfg = gemv_mma.pick_config(m, k, n, 4, 16, G._sm_count(device), staged=gemv_mma.sstats(), stat_bits=3,
                                       stat_group=16)
            row = {"spqr_shape": f"{k}x{n}", "m": m, "picked": cfg, "splits": k // cfg["KC"] if cfg else None,
                   "default_us": round(us(layers[0.01], False), 2), "mma_us": round(us(layers[0.01], True), 2),
                   "mma_reg_us": round(us(layers[0.01], True, sstats="0"), 2),
                   "mma_raw_us": round(us(layers[0.01], True, sstats="2"), 2),
                   "mma_raw_no_adapter_us": round(us(layers[0.01], True, False, sstats="2"), 2),
                   "mma_raw_opre_us": round(us(layers[0.01], True, sstats="2", opre="1"), 2),
                   "mma_no_outliers_us": round(us(layers[0.0], True), 2),
                   "mma_no_adapter_us": round(us(layers[0.01], True, False), 2),
                   "default_no_outliers_us": round(us(layers[0.0], False), 2),
                   "bf16_us": round(timer.us(lambda: [x @ w for w in dense]) / len(dense), 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del layers
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the checks and rows here")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new timings after this")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer checks; 4-bit timings only: 4096x4096 and "
                    "gate|up first, then q|k|v and down_proj while --budget-s lasts")
    ap.add_argument("--ms", default="1,8", help="comma-separated rows of x to time (each at most 16)")
    ap.add_argument("--spqr", action="store_true", help="time SpQR layers instead (spqr_timings: its default "
                    "path against the tensor-core kernel, with and without outliers)")
    ap.add_argument("--shapes", default="", help="comma-separated indices into SHAPES to time, in this order "
                    "(0 4096x4096, 1 q|k|v, 2 gate|up, 3 down_proj; default: all, or --quick's order)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemv_mma_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    res["checks"] = checks(device, a.quick)
    print("checks:", res["checks"]["passed"], "passed,", len(res["checks"]["failed"]), "failed",
          f"({time.time() - t0:.0f} s)", flush=True)
    if a.spqr and not a.skip_timing:
        res["rows"] = spqr_timings(device, Timer(True), t0 + a.budget_s, tuple(int(m) for m in a.ms.split(",")))
    elif not a.skip_timing:
        res["rows"] = timings(device, Timer(True), t0 + a.budget_s, a.quick, tuple(int(m) for m in a.ms.split(",")),
                              tuple(int(i) for i in a.shapes.split(",") if i))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0 if not res["checks"]["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
