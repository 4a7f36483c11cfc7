"""Correctness of the small-M decode kernel on a CUDA GPU at real shapes, before any decode timing counts.

    python bench/gpu_check_decode.py               (exit status 1 if any check fails; JSON, then one line)
    python bench/gpu_check_decode.py --cpu-smoke   (small shapes in Triton's interpreter: tests this script)

1. kernel: gemv_triton against the fp32 torch reference (gemv_reference) and float64, at LLaMA-7B shapes,
   2/3/4/8 bit, plain / act-order repacked / act-order gathered / float zeros, M = 1, 2, 8, 16, bf16 and
   fp16, with and without a fused LoRA (r=16); each result twice: split-K must be deterministic and leave
   its counters at zero;
2. graphs: the op under torch.compile (mode reduce-overhead, CUDA graphs) equals eager, replayed 3 times;
3. generation: a small random GPTQ LLaMA with an adapter, greedy, 24 new tokens, batch 1 and 3, fp32: the
   compiled static-cache kernel path (`--decode compiled`) gives the tokens the eager torch reference path
   gives (in bf16 the two round differently; the share of equal tokens is reported, not checked).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from gptqlora.kernels.gemv import gemv_reference, gemv_triton, plan_gemv
from gptqlora.kernels.reference import dequantize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check import packed  # noqa: E402  (random packed layers, shared with the training checks)

LAYOUTS = {"plain": (False, False, True), "act-order": (True, False, True), "act-order-gather": (True, False, False),
           "float-zeros": (True, True, True)}  # act_order, float_zeros, repack


def rel(got, ref) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def check_kernel(device, shapes, ms) -> list[dict]:
    rows, i = [], 0
    for k, n in shapes:
        for bits in (2, 3, 4, 8):
            group = 64 if bits == 2 else 128
            for name, (act, fz, repack) in LAYOUTS.items():
                p = packed(k, n, bits, group, act, fz, k + n + bits, device)
                plan = plan_gemv(p[0], p[3], bits, group, repack)
                w64 = dequantize(*p, bits, torch.float64)
                for m in ms:
                    i += 1
                    dtype = (torch.bfloat16, torch.float16)[i % 2]
                    lora = i % 3 != 0
                    g = torch.Generator(device=device).manual_seed(i)
                    x = torch.randn(m, k, device=device, generator=g).to(dtype)
                    a = (torch.randn(16, k, device=device, generator=g) * 0.05).to(dtype) if lora else None
                    b = (torch.randn(n, 16, device=device, generator=g) * 0.05).to(dtype) if lora else None
                    y = gemv_triton(x, *p, bits, plan, a, b, 2.0)
                    y2 = gemv_triton(x, *p, bits, plan, a, b, 2.0)
                    ref = gemv_reference(x, *p, bits, a, b, 2.0)
                    want = x.double() @ w64
                    if lora:
                        want += 2.0 * (x.double() @ a.double().t()) @ b.double().t()
                    e_ref, e64 = rel(y, ref), rel(y, want)
                    tol = 1.2e-2 if dtype == torch.bfloat16 else 2e-3
                    rows.append({"check": "kernel", "shape": f"{k}x{n}", "bits": bits, "layout": name, "m": m,
                                 "dtype": str(dtype)[6:], "lora": lora, "sorted": plan.sorted,
                                 "rel_err_vs_reference": e_ref, "rel_err_vs_float64": e64,
                                 "ok": e_ref < tol and e64 < tol and torch.equal(y, y2) and not plan.locks.any()
                                 and bool(torch.isfinite(y).all())})
    return rows


def check_graphs(device, k, n) -> dict:
    """A QuantLinear (act-order: its repacked copy is a buffer) decoding under torch.compile with CUDA graphs."""
    from gptqlora.formats.gptq import GPTQSpec
    from gptqlora.nn.quant_linear import QuantLinear

    p = packed(k, n, 4, 128, True, False, 7, device)
    layer = QuantLinear.from_packed(GPTQSpec(k, n, 4, 128), dict(zip(("qweight", "qzeros", "scales", "g_idx"), p)))
    a = torch.randn(16, k, device=device, dtype=torch.bfloat16) * 0.05
    b = torch.randn(n, 16, device=device, dtype=torch.bfloat16) * 0.05

    def f(x):
        return torch.relu(layer.small_m(x, a, b, 2.0)) + 1.0

    with torch.no_grad():
        f(torch.randn(2, k, device=device, dtype=torch.bfloat16))  # builds the plan before compiling
        fc = torch.compile(f, mode="reduce-overhead", fullgraph=True)
        ok, errs = layer.gemv_qweight is not None, []
        for _ in range(4):
            x = torch.randn(2, k, device=device, dtype=torch.bfloat16)
            got, want = fc(x).clone(), f(x)
            errs.append(rel(got, want))
            ok &= torch.equal(got, want) and not layer.gemv_locks.any()
    return {"check": "graphs", "rel_err": max(errs), "ok": ok}


def check_generation(device, hidden, inter) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import gptqlora
    from gptqlora.adapters import GPTQLoraConfig
    from gptqlora.inference import Sampling, decode_kwargs
    from gptqlora.nn.quant_linear import QuantLinear
    from gptqlora.nn.skeleton import quantize_skeleton

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
    model = quantize_skeleton(LlamaForCausalLM(cfg), 4, 128, device="cpu").to(device)
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            k, nn_ = mod.in_features, mod.out_features
            q = packed(k, nn_, 4, 128, True, False, k + nn_, device)
            mod.qweight.copy_(q[0]); mod.qzeros.copy_(q[1]); mod.g_idx.copy_(q[3])  # noqa: E702
            mod.scales.copy_(q[2] / (k ** 0.5 * 0.01))
    pm = gptqlora.get_peft_model(model, GPTQLoraConfig(r=8, lora_dropout=0.0, init_lora_weights="gaussian")).eval()
    out = {}
    for batch in (1, 3):
        gen = torch.Generator(device=device).manual_seed(batch)
        ids = torch.randint(0, 512, (batch, 20), device=device, generator=gen)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
        for name, backend, mode in (("reference", "torch", "eager"), ("kernel", "triton", "compiled")):
            os.environ["GPTQLORA_KERNEL"] = backend
            fast = decode_kwargs(pm, Sampling(decode=mode), 44) if device.type == "cuda" else {}
            with torch.inference_mode():
                out[name, batch] = pm.generate(input_ids=ids, **kw, **fast)[:, 20:].tolist()
    os.environ.pop("GPTQLORA_KERNEL")
    same = all(out["kernel", b] == out["reference", b] for b in (1, 3))
    res = {"check": "generation", "reference": out["reference", 3], "kernel": out["kernel", 3], "ok": same}
    if device.type == "cuda":  # bf16: the two paths round differently, so near-ties may flip; reported only
        pm.to(torch.bfloat16)
        agree = []
        for batch in (1, 3):
            gen = torch.Generator(device=device).manual_seed(batch)
            ids = torch.randint(0, 512, (batch, 20), device=device, generator=gen)
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
            outs = []
            for backend, mode in (("torch", "eager"), ("triton", "compiled")):
                os.environ["GPTQLORA_KERNEL"] = backend
                with torch.inference_mode():
                    outs.append(pm.generate(input_ids=ids, **kw, **decode_kwargs(pm, Sampling(decode=mode), 44)))
            agree.append(float((outs[0] == outs[1]).float().mean()))
        os.environ.pop("GPTQLORA_KERNEL")
        res["bf16_token_agreement"] = agree
    return res


def main(argv: list[str]) -> int:
    if "--cpu-smoke" in argv:  # Triton's interpreter (TRITON_INTERPRET=1, set before python starts)
        device, shapes, ms, gen = torch.device("cpu"), ((256, 128),), (1, 5), (128, 256)
    elif torch.cuda.is_available():
        device, shapes, ms, gen = torch.device("cuda"), ((4096, 4096), (4096, 11008), (11008, 4096)), \
            (1, 2, 8, 16), (512, 1024)
    else:
        sys.stderr.write("no CUDA device (or run with --cpu-smoke under TRITON_INTERPRET=1)\n")
        return 1
    t0 = time.time()
    rows = check_kernel(device, shapes, ms)
    if device.type == "cuda":
        rows.append(check_graphs(device, *shapes[0]))
    rows.append(check_generation(device, *gen))
    bad = [r for r in rows if not r["ok"]]
    kern = [r for r in rows if r["check"] == "kernel"]
    sys.stdout.write(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                 "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "failed": bad},
                                indent=1) + "\n")
    sys.stdout.write(f"gpu_check_decode: {len(rows) - len(bad)}/{len(rows)} ok in {time.time() - t0:.0f} s; kernel "
                     f"worst rel err vs fp32 reference {max(r['rel_err_vs_reference'] for r in kern):.1e}, vs "
                     f"float64 {max(r['rel_err_vs_float64'] for r in kern):.1e}; generation kernel == reference: "
                     f"{rows[-1]['ok']}\n")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
