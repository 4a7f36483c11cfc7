"""Correctness of the small-M decode kernel on a CUDA GPU at real shapes, before any decode timing counts.

    python bench/gpu_check_decode.py            (H200: ~30-50 s; exit 0 only if every section ran and passed)
    TRITON_INTERPRET=1 python bench/gpu_check_decode.py --small      (CPU, Triton's interpreter: tests this script)

Prints a JSON record (failures, skipped sections, seconds per section), then one summary line.

1. kernel: gemv_triton against the fp32 torch reference (gemv_reference) and float64, at the LLaMA-7B shapes
   4096->4096, 4096->11008, 11008->4096; 2/3/4/8 bit (group 64 at 2 bit, else 128); the two layouts real
   checkpoints use (plain rows, and act-order read through its repacked copy), M = 1, 8, 16, bf16, a fused
   r=16 LoRA. Each result twice: split-K must be deterministic and leave its counters at zero. Then a few
   extra cases at 4096->4096 only: the act-order per-row gather (no copy), float zeros, no LoRA, fp16.
2. graphs: a QuantLinear with LoRA under torch.compile (fullgraph, mode reduce-overhead: CUDA graphs) equals
   eager at M = 1 and 8, replayed 3 times, with no graph break and no skipped CUDA graph (inductor's
   `cudagraph_skips` counter).
3. generation: a 1-layer random GPTQ LLaMA with an adapter, greedy, fp32, batch 1 and 3 (one row left-padded):
   graph_decode's loop (`--decode compiled`: the step compiled, then captured in a CUDA graph) gives the
   tokens the eager torch reference path gives through transformers' generate; the step compiles with no
   graph break, is captured (greedy and sampled: one graph each), and a second call replaying the graph
   from a new prefill gives the same tokens. A row may part from the reference only where the reference's
   top two logits tie (`near_ties`), and never in its first two tokens.
4. spqr: SpQR's decode launch (the small-M kernel decoding 3-bit statistics, the CSR SpMV), with and without
   the fused adapter, at the three shapes against float64.
5. generation-mma: section 3 in fp16 through the default route: batch 1 on the Triton kernels, batch 3 on
   the tensor-core kernel (kernels/gemv_mma.py), every layer planned again in between.

Why this is fast (the first version did not finish in 150 s): every distinct specialization of the kernel is
a Triton compilation (~1-2 s each). M and the split count are runtime arguments of the kernel now, the case
list keeps one compilation per (bits, layout, M = 1 or not, LoRA, dtype), about 26 in all, and those are
compiled first in parallel worker processes (`--jobs`, into Triton's disk cache) before the checks run.
The references are computed once per layer (x of M = 16; M = 1 and 8 take its first rows), and the
generation check compiles one small model once (the bf16 agreement of the old version is gone: it
compiled a second model and was only reported, never checked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from gptqlora.kernels.gemv import gemv_reference, gemv_triton, plan_gemv
from gptqlora.kernels.reference import dequantize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import packed  # noqa: E402  (random packed layers, shared with the training checks)

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
SMALL_SHAPES = ((256, 128), (256, 384), (384, 128))  # --small: the same three aspect ratios, interpreter-sized
BITS = (2, 3, 4, 8)
MS = (1, 8, 16)
R = 16


def rel(got, ref) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def cases(shapes) -> list[dict]:
    """Every kernel case: the main grid over the real shapes, then the extras at the first shape."""
    out = []
    for k, n in shapes:
        for bits in BITS:
            for layout in ("plain", "act-order"):
                out.append(dict(k=k, n=n, bits=bits, layout=layout, ms=MS, lora=True, dtype="bfloat16"))
    k, n = shapes[0]
    for bits in (3, 4):
        out.append(dict(k=k, n=n, bits=bits, layout="act-order-gather", ms=(1, 8), lora=True, dtype="bfloat16"))
    out.append(dict(k=k, n=n, bits=4, layout="float-zeros", ms=(1, 8), lora=True, dtype="bfloat16"))
    out.append(dict(k=k, n=n, bits=2, layout="act-order", ms=(1, 8), lora=False, dtype="bfloat16"))
    out.append(dict(k=k, n=n, bits=4, layout="act-order", ms=(1, 8), lora=True, dtype="float16"))
    return out


def compile_classes(all_cases) -> list[dict]:
    """One case per distinct kernel compilation (bits, layout, M = 1 or not, LoRA, dtype), at the smallest
    shape: what the warm-up workers run."""
    seen, out = set(), []
    small = min((c["k"] * c["n"], (c["k"], c["n"])) for c in all_cases)[1]
    for c in all_cases:
        for m in sorted({1 if m == 1 else 16 for m in c["ms"]}):
            key = (c["bits"], c["layout"], m, c["lora"], c["dtype"])
            if key not in seen:
                seen.add(key)
                out.append({**c, "k": small[0], "n": small[1], "ms": (m,)})
    return out


def layer(c, device):
    """Packed buffers and the kernel plan of case c (the plain layout: the act-order layer's own codes
    with the trivial group map)."""
    k, n, bits = c["k"], c["n"], c["bits"]
    group = 64 if bits == 2 else 128
    p = list(packed(k, n, bits, group, c["layout"] != "plain", c["layout"] == "float-zeros", k + n + bits, device))
    if c["layout"] == "plain":
        p[3] = torch.arange(k, device=device, dtype=torch.int32) // group
    plan = plan_gemv(p[0], p[3], bits, group, repack=c["layout"] != "act-order-gather")
    return p, plan


def run_case(c, device) -> list[dict]:
    p, plan = layer(c, device)
    bits, k, n = c["bits"], c["k"], c["n"]
    dtype = getattr(torch, c["dtype"])
    g = torch.Generator(device=device).manual_seed(k + n + bits)
    mmax = max(c["ms"])
    x = torch.randn(mmax, k, device=device, generator=g).to(dtype)
    a = (torch.randn(R, k, device=device, generator=g) * 0.05).to(dtype) if c["lora"] else None
    b = (torch.randn(n, R, device=device, generator=g) * 0.05).to(dtype) if c["lora"] else None
    ref = gemv_reference(x, *p, bits, a, b, 2.0)  # fp32 dense W, once per layer
    want = x.double() @ dequantize(*p, bits, torch.float64)
    if c["lora"]:
        want += 2.0 * (x.double() @ a.double().t()) @ b.double().t()
    rows = []
    tol = 1.2e-2 if dtype == torch.bfloat16 else 2e-3
    for m in c["ms"]:
        y = gemv_triton(x[:m], *p, bits, plan, a, b, 2.0)
        y2 = gemv_triton(x[:m], *p, bits, plan, a, b, 2.0)
        e_ref, e64 = rel(y, ref[:m]), rel(y, want[:m])
        same, locks = torch.equal(y, y2), not plan.locks.any()
        rows.append({"check": "kernel", "shape": f"{k}x{n}", "bits": bits, "layout": c["layout"], "m": m,
                     "dtype": c["dtype"], "lora": c["lora"], "sorted": plan.sorted,
                     "rel_err_vs_reference": e_ref, "rel_err_vs_float64": e64, "deterministic": same,
                     "counters_zero": locks,
                     "ok": e_ref < tol and e64 < tol and same and locks and bool(torch.isfinite(y).all())})
    return rows


def warm(classes, jobs: int, argv: list[str]) -> str:
    """Compile every kernel class in `jobs` worker processes (each runs its share of the classes once,
    filling Triton's disk cache), so that the checks below load compiled kernels instead of compiling
    them one after another. Failures here are not check failures: the checks compile what is missing."""
    if jobs <= 1 or len(classes) < 2:
        return "serial"
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--warm-worker", f"{i}/{jobs}", *argv],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(min(jobs, len(classes)))]
    errs = []
    for pr in procs:
        _, err = pr.communicate()
        if pr.returncode:
            errs.append(err.strip().splitlines()[-1] if err.strip() else f"rc {pr.returncode}")
    return "ok" if not errs else f"{len(errs)} of {len(procs)} workers failed: {errs[0][:200]}"


def check_graphs(device, k, n) -> dict:
    """A QuantLinear (act-order: its repacked copy is a buffer) with LoRA, decoding under torch.compile with
    CUDA graphs (on CPU: the eager backend, which checks the capture in one graph but not CUDA graphs)."""
    from torch._dynamo.utils import counters

    from gptqlora.formats.gptq import GPTQSpec
    from gptqlora.nn.quant_linear import QuantLinear

    p = packed(k, n, 4, 128, True, False, 7, device)
    layer = QuantLinear.from_packed(GPTQSpec(k, n, 4, 128), dict(zip(("qweight", "qzeros", "scales", "g_idx"), p)))
    a = torch.randn(R, k, device=device, dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, R, device=device, dtype=torch.bfloat16) * 0.05

    def f(x):
        return torch.relu(layer.small_m(x, a, b, 2.0)) + 1.0

    cuda = device.type == "cuda"
    layer.kernel = "triton"  # on CPU too (the interpreter)
    torch._dynamo.reset()
    counters.clear()
    ok, errs = True, []
    with torch.no_grad():
        f(torch.randn(2, k, device=device, dtype=torch.bfloat16))  # builds the plan before compiling
        ok &= layer.gemv_qweight is not None
        fc = torch.compile(f, fullgraph=True, **({"mode": "reduce-overhead"} if cuda else {"backend": "eager"}))
        for m in (1, 8):
            for _ in range(4):  # the first call records, the next three replay
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                got = fc(x).clone()
                want = f(x)
                errs.append(rel(got, want))
                ok &= torch.equal(got, want) and not layer.gemv_locks.any()
    skips = int(counters["inductor"].get("cudagraph_skips", 0))
    breaks = sum(counters["graph_break"].values())
    return {"check": "graphs", "rel_err": max(errs), "cudagraph_skips": skips, "graph_breaks": breaks,
            "ok": bool(ok) and skips == 0 and breaks == 0}


def check_spqr(device, shapes) -> list[dict]:
    """SpQR's decode launch (3-bit g16 codes, 3-bit statistics, 1% outliers, act-order through the repacked
    copy) at each shape, M = 1 and 8, with the r=16 adapter fused in and without, against x @ W in float64
    (W: the torch reference's dense weight, outliers added) plus the LoRA update."""
    import importlib.util

    from gptqlora.kernels.spqr import spqr_weight
    from gptqlora.kernels.spqr_triton import spqr_small_m

    spec = importlib.util.spec_from_file_location("bench_spqr", os.path.join(os.path.dirname(__file__), "spqr.py"))
    bench_spqr = importlib.util.module_from_spec(spec)  # by its path: a module named `spqr` could be another
    spec.loader.exec_module(bench_spqr)
    rows = []
    for k, n in shapes:
        layer = bench_spqr.spqr_layer(k, n, device=device)  # random codes, statistics and outliers
        t = layer.tensors()
        w = spqr_weight(t, 3, 3, torch.float32, "torch").double()  # (K, N)
        g = torch.Generator(device=device).manual_seed(k + n)
        a = torch.randn(R, k, device=device, generator=g).to(torch.bfloat16) * 0.05
        b = torch.randn(n, R, device=device, generator=g).to(torch.bfloat16) * 0.05
        x16 = torch.randn(8, k, device=device, generator=g).to(torch.bfloat16)
        plan = plan_gemv(t.qweight, t.g_idx, 3, 16)  # act-order: the repacked copy, read through perm
        for m, lora in ((1, True), (8, True), (1, False)):
            x = x16[:m]
            want = x.double() @ w + (2.0 * (x.double() @ a.double().t()) @ b.double().t() if lora else 0)
            got = spqr_small_m(x, t, 3, 3, plan, a if lora else None, b if lora else None, 2.0)
            err = rel(got, want)
            rows.append({"check": "spqr", "shape": f"{k}x{n}", "m": m, "lora": lora, "rel_err": err,
                         "ok": bool(torch.isfinite(got).all()) and err < 2e-2 and not plan.locks.any()})
    return rows


TIE = 5e-3  # a greedy step whose reference top two logits lie within TIE x its largest |logit| is a tie


def near_ties(ref: torch.Tensor, got: torch.Tensor, scores: torch.Tensor) -> list[dict]:
    """Rows (B, T) of greedy tokens that part from the reference's: where and by what margin each first does,
    "tie" when the kernel's token there scored within TIE of the reference's own (fp16 rounding may then pick
    either; the tokens after a parting are not compared). A random 1-layer model's logits lie close together:
    session 19's fp16 check parted at the 11th of 12 tokens in one row of three (reference 309, kernel 456)."""
    out = []
    for b in range(ref.shape[0]):
        diff = (ref[b] != got[b]).nonzero()
        if len(diff):
            t = int(diff[0])
            step = scores[b, t]
            margin = float(step[ref[b, t]] - step[got[b, t]])
            out.append({"row": b, "step": t, "margin": margin, "tie": margin <= TIE * float(step.abs().max())})
    return out


def check_generation(device, hidden, inter, dtype: torch.dtype = torch.float32) -> dict:
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    import gptqlora
    from gptqlora.adapters import GPTQLoraConfig
    from gptqlora.graph_decode import decoder_for
    from gptqlora.inference import prepare_decode
    from gptqlora.nn.quant_linear import QuantLinear
    from gptqlora.nn.skeleton import quantize_skeleton

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
    model = quantize_skeleton(LlamaForCausalLM(cfg), 4, 128, device="cpu").to(device=device, dtype=dtype)
    g_idx = {}  # siblings (q|k|v, gate|up) share their act-order map, as GPTQ gives them: one launch each
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            k, nn_ = mod.in_features, mod.out_features
            q = packed(k, nn_, 4, 128, True, False, k + nn_, device)
            mod.qweight.copy_(q[0]); mod.qzeros.copy_(q[1]); mod.g_idx.copy_(g_idx.setdefault(k, q[3]))  # noqa: E702
            mod.scales.copy_(q[2] / (k ** 0.5 * 0.01))
    pm = gptqlora.get_peft_model(model, GPTQLoraConfig(r=8, lora_dropout=0.0, init_lora_weights="gaussian")).eval()
    cuda = device.type == "cuda"  # CUDA: the step compiled and captured in a CUDA graph; CPU: the same loop, eager
    out, graphed, reused, sampled_ok, ties = {}, True, True, True, []
    torch._dynamo.reset()
    counters.clear()
    for batch in (1, 3):
        gen = torch.Generator(device=device).manual_seed(batch)
        ids = torch.randint(3, 512, (batch, 20), device=device, generator=gen)
        mask = torch.ones_like(ids)
        mask[1:2, :6] = 0  # batch 3: row 1 left-padded
        ids = ids.masked_fill(mask == 0, 0)
        os.environ["GPTQLORA_KERNEL"] = "torch"
        with torch.inference_mode():
            res = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=2, disable_compile=True, output_scores=True, return_dict_in_generate=True)
        ref, scores = res.sequences[:, 20:], torch.stack(res.scores, 1).float()  # (B, T), (B, T, V)
        os.environ["GPTQLORA_KERNEL"] = "triton"
        prepare_decode(pm, batch)  # what generate_ids does: the batch picks the kernel (gemv_mma.wanted)
        fused = sum(1 for m in pm.modules() if getattr(m, "_group_gemv", None))  # q|k|v, gate|up: one launch each
        dec = decoder_for(pm, batch, 64)
        with torch.inference_mode():
            got = dec.run(ids, mask, 12, [2], 0, sample=False)
            again = dec.run(ids, mask, 12, [2], 0, sample=False)  # the captured graph replayed from a new prefill
            drawn = dec.run(ids, mask, 12, [2], 0, sample=True, temperature=0.8, top_p=0.9)
        out["reference", batch], out["kernel", batch] = ref.tolist(), got[:, :ref.shape[1]].tolist()
        ties += near_ties(ref, got[:, :ref.shape[1]], scores)
        graphed &= len(dec.graphs) == (2 if cuda else 0) and dec.use_graph == cuda
        reused &= torch.equal(again, got)
        sampled_ok &= drawn.shape == (batch, 12) and bool(((drawn >= 0) & (drawn < 512)).all())
    os.environ.pop("GPTQLORA_KERNEL")
    # every row equal, or parting only where the reference's top two tied, and never in the first two tokens
    same = all(t["tie"] and t["step"] >= 2 for t in ties)
    breaks = sum(counters["graph_break"].values())
    res = {"check": "generation", "reference": out["reference", 3], "kernel": out["kernel", 3], "same": same,
           "parted_at_ties": ties,
           "graphed": graphed, "reused": reused, "sampled_ok": sampled_ok, "graph_breaks": breaks, "fused_groups": fused,
           "graph_break_reasons": {k[:300]: v for k, v in counters["graph_break"].items()},
           "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
           "mma_layers": sum(1 for m in pm.modules()  # layers whose decode copy is gemv_mma's (4-D)
                             if getattr(m, "gemv_qweight", None) is not None and m.gemv_qweight.dim() == 4)}
    res["ok"] = same and graphed and reused and sampled_ok and breaks == 0 and fused == 2
    return res


def check_generation_mma(device, hidden, inter) -> dict:
    """check_generation in fp16 with GPTQLORA_GEMV_MMA unset, the default route (gemv_mma.wanted): batch 1
    through the Triton kernels, then batch 3 with every layer planned again for the tensor-core kernel
    (kernels/gemv_mma.py) and every decode call through it, compiled and captured in the CUDA graph."""
    from gptqlora.kernels import gemv_mma

    if device.type != "cuda":
        return {"check": "generation-mma", "ok": True, "skipped": "CUDA only"}
    from gptqlora.kernels import gemv

    calls = {"kernel": 0, "dense": 0}  # counted while Python runs the ops (the eager and warm-up steps)

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    kernel_fn, dense_fn = gemv_mma.gemv_mma, gemv._dense
    gemv_mma.gemv_mma, gemv._dense = counted(kernel_fn, "kernel"), counted(dense_fn, "dense")
    env = os.environ.pop(gemv_mma.ENV, None)
    try:  # fp16: the kernel takes 16-bit x only (an fp32 model would test the dense fallback alone, as session 16's did)
        res = check_generation(device, hidden, inter, torch.float16)
    finally:
        if env is not None:
            os.environ[gemv_mma.ENV] = env
        gemv_mma.gemv_mma, gemv._dense = kernel_fn, dense_fn
    return {**res, "check": "generation-mma", "calls": calls,
            "ok": res["ok"] and res["mma_layers"] == 7 and calls["kernel"] > 0 and calls["dense"] == 0}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="interpreter-sized shapes (CPU, TRITON_INTERPRET=1)")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # the old name of --small
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: kernel, graphs, generation, spqr, "
                    "generation-mma")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="worker processes compiling the kernels first (GPU; 1: none)")
    ap.add_argument("--budget-s", type=float, default=120, help="start no section after this many seconds")
    ap.add_argument("--warm-worker", help=argparse.SUPPRESS)  # "i/N": compile share i of N, then exit
    a = ap.parse_args(argv)
    small = a.small or a.cpu_smoke
    if small:
        device, shapes, gen = torch.device("cuda" if torch.cuda.is_available() else "cpu"), SMALL_SHAPES, (128, 256)
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            sys.stderr.write("--small on CPU needs TRITON_INTERPRET=1 (set before python starts)\n")
            return 2
    elif torch.cuda.is_available():
        device, shapes, gen = torch.device("cuda"), SHAPES, (512, 1024)
    else:
        sys.stderr.write("no CUDA device (or run with --small under TRITON_INTERPRET=1)\n")
        return 2
    all_cases = cases(shapes)
    classes = compile_classes(all_cases)
    if a.warm_worker:
        i, n = map(int, a.warm_worker.split("/"))
        for c in classes[i::n]:
            run_case(c, device)
        return 0
    t0 = time.time()
    rows, seconds, skipped = [], {}, []
    extra = ["--small"] if small else []
    warm_state = warm(classes, a.jobs, extra) if device.type == "cuda" and "kernel" not in a.skip else "none"
    seconds["warm"] = round(time.time() - t0, 1)
    sections = [("kernel", lambda: [r for c in all_cases for r in run_case(c, device)]),
                ("graphs", lambda: [check_graphs(device, *shapes[0])]),
                ("generation", lambda: [check_generation(device, *gen)]),
                ("spqr", lambda: check_spqr(device, shapes)),
                ("generation-mma", lambda: [check_generation_mma(device, *gen)])]
    for name, fn in sections:
        if name in a.skip.split(","):
            continue
        if time.time() - t0 > a.budget_s:
            skipped.append(name)
            continue
        t = time.time()
        rows += fn()
        seconds[name] = round(time.time() - t, 1)
    bad = [r for r in rows if not r["ok"]]
    kern = [r for r in rows if r["check"] == "kernel"]
    gen_row = next((r for r in rows if r["check"] == "generation"), None)
    graph_row = next((r for r in rows if r["check"] == "graphs"), None)
    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "shapes": [f"{k}x{n}" for k, n in shapes],
              "kernel_cases": len(kern), "compile_classes": len(classes), "warm": warm_state, "seconds": seconds,
              "skipped": skipped, "graphs": graph_row, "generation": gen_row, "failed": bad}
    sys.stdout.write(json.dumps(record, indent=1) + "\n")
    worst = (f"worst rel err vs fp32 reference {max(r['rel_err_vs_reference'] for r in kern):.1e}, vs float64 "
             f"{max(r['rel_err_vs_float64'] for r in kern):.1e}") if kern else "kernel not run"
    line = (f"gpu_check_decode: {'PASS' if not bad and not skipped else 'FAIL'} {len(rows) - len(bad)}/{len(rows)} ok "
            f"in {time.time() - t0:.0f} s ({len(classes)} kernel compilations, warm {warm_state}); {worst}")
    if graph_row:
        line += f"; graphs: skips {graph_row['cudagraph_skips']} breaks {graph_row['graph_breaks']}"
    if gen_row:
        line += (f"; generation kernel == reference: {gen_row['same']}, fused groups {gen_row['fused_groups']}, graphed {gen_row['graphed']}, reused "
                 f"{gen_row['reused']}, sampled {gen_row['sampled_ok']}, dynamo graphs {gen_row['unique_graphs']}, "
                 f"breaks {gen_row['graph_breaks']}")
    if skipped:
        line += f"; SKIPPED (over --budget-s): {', '.join(skipped)}"
    sys.stdout.write(line + "\n")
    return 0 if not bad and not skipped else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
