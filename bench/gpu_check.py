"""Correctness on a CUDA GPU at real shapes, before any timing counts.

    python bench/gpu_check.py          (exit status 1 if any check fails; a table on stdout)

1. dequant: the Triton kernel equals the torch reference bit for bit at LLaMA shapes, 2/3/4/8 bit,
   fp16 and bf16, act-order, packed and float zeros (fresh random layers, poisoned output);
2. layers: quant_matmul (forward, dx) and the fused base+LoRA function (forward, dx, dA, dB) on the
   Triton path against float64 references, M = 1, 7, 4099, bf16;
3. siblings: the grouped function (q/k/v-like layers sharing one input and dropout mask) against float64;
4. launches: the fast launch path (kernels/launch.py) on aligned and misaligned inputs in turn, against the
   torch reference (a cached kernel compiled for aligned pointers must not serve a misaligned one);
5. training: a few GPTQ-LoRA steps of a small random LLaMA with bf16 autocast and gradient checkpointing,
   Triton path against the reference path: the same losses within bf16 noise, finite gradients;
6. with --compile: the same steps with every decoder block compiled by inductor (train/compile.py, what
   `finetune --compile blocks` does) against the eager Triton path, and no graph breaks.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from gptqlora.formats.gptq import pack_cols, pack_rows
from gptqlora.kernels.autograd import quant_matmul
from gptqlora.kernels.dequant import dequantize_triton, plan_for
from gptqlora.kernels.lora_dropout import dropout_mask
from gptqlora.kernels.quant_lora import PackedBase, quant_lora_group, quant_lora_matmul
from gptqlora.kernels.reference import dequantize


def packed(k, n, bits, group, act_order, float_zeros, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    ng = -(-k // group)  # a last, shorter group when group does not divide k
    codes = torch.randint(0, 2**bits, (k, n), device=device, dtype=torch.int32, generator=g)
    zeros = torch.randint(0, 2**bits, (ng, n), device=device, dtype=torch.int32, generator=g)
    scales = (torch.rand(ng, n, device=device, generator=g) * 0.02 + 1e-3).half()
    g_idx = torch.arange(k, device=device, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, device=device, generator=g)]
    z = zeros.float() + torch.rand(ng, n, device=device, generator=g) - 0.5 if float_zeros else pack_cols(zeros, bits)
    return pack_rows(codes, bits), z, scales, g_idx


def rel(got, ref) -> float:
    return float((got.double() - ref).norm() / ref.norm())


def check_dequant(device, shapes) -> list[dict]:
    rows = []
    for k, n in shapes:
        for bits in (2, 3, 4, 8):
            for act_order, float_zeros in ((False, False), (True, False), (True, True)):
                p = packed(k, n, bits, 128, act_order, float_zeros, k + bits, device)
                for dtype in (torch.float16, torch.bfloat16):
                    want = dequantize(*p, bits, dtype)
                    for kernel, plan in (("grouped", plan_for(p[3], 128)), ("gather", None)):
                        out = torch.full((k, n), float("nan"), dtype=dtype, device=device)
                        dequantize_triton(*p, bits, out=out, plan=plan)
                        rows.append({"check": "dequant", "kernel": kernel, "shape": f"{k}x{n}", "bits": bits,
                                     "act_order": act_order, "float_zeros": float_zeros, "dtype": str(dtype)[6:],
                                     "ok": torch.equal(out, want) and (kernel == "gather" or plan is not None)})
    return rows


def check_layers(device, k, n) -> list[dict]:
    rows = []
    r = 8
    for bits in (2, 3, 4, 8):
        p = packed(k, n, bits, 128, True, False, bits, device)
        w = dequantize(*p, bits, torch.float64)  # (K, N)
        for m in (1, 7, 4099):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
            y = quant_matmul(x, *p, bits, "triton")
            (gx,) = torch.autograd.grad(y, x, dy)
            e = max(rel(y, x.detach().double() @ w), rel(gx, dy.double() @ w.t()))
            a = (torch.randn(r, k, device=device) * 0.02).requires_grad_()
            b = (torch.randn(n, r, device=device) * 0.02).requires_grad_()
            for p_drop in (0.0, 0.1):
                torch.manual_seed(m)
                y2 = quant_lora_matmul(x, a, b, *p, bits, 2.0, p_drop, "triton", plan_for(p[3], 128))
                gx2, ga, gb = torch.autograd.grad(y2, (x, a, b), dy)
                torch.manual_seed(m)  # the Philox seed the function drew
                keep = dropout_mask(m, k, p_drop, int(torch.randint(0, 2**31 - 1, (1,))), device).double() \
                    / (1 - p_drop) if p_drop else 1.0
                x64, a64, b64, dy64 = x.detach().double(), a.detach().double(), b.detach().double(), dy.double()
                xa = (x64 * keep) @ a64.t()
                want = x64 @ w + 2.0 * xa @ b64.t()
                dxa = 2.0 * dy64 @ b64
                e2 = max(rel(y2, want), rel(gx2, dy64 @ w.t() + (dxa @ a64) * keep), rel(ga, dxa.t() @ (x64 * keep)),
                         rel(gb, 2.0 * dy64.t() @ xa))
                rows.append({"check": "layer", "bits": bits, "m": m, "dropout": p_drop, "quant_matmul_rel_err": e,
                             "quant_lora_rel_err": e2, "ok": e < 1e-2 and e2 < 1e-2})
    return rows


def check_group(device, k, widths) -> list[dict]:
    rows = []
    m, r = 4099, 8
    packs = [packed(k, n, bits, 128, True, False, n + bits, device) for n, bits in widths]
    bases = [PackedBase(*p, bits, plan_for(p[3], 128)) for p, (_, bits) in zip(packs, widths)]
    ws = [dequantize(*p, bits, torch.float64) for p, (_, bits) in zip(packs, widths)]
    for p_drop in (0.0, 0.1):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        a = [(torch.randn(r, k, device=device) * 0.02).requires_grad_() for _ in widths]
        b = [(torch.randn(n, r, device=device) * 0.02).requires_grad_() for n, _ in widths]
        dys = [torch.randn(m, n, device=device, dtype=torch.bfloat16) for n, _ in widths]
        torch.manual_seed(11)
        ys = quant_lora_group(x, bases, a, b, [2.0] * len(widths), p_drop, "triton")
        grads = torch.autograd.grad(ys, (x, *a, *b), dys)
        torch.manual_seed(11)
        keep = dropout_mask(m, k, p_drop, int(torch.randint(0, 2**31 - 1, (1,))), device).double() \
            / (1 - p_drop) if p_drop else 1.0
        x64 = (x.detach().double() * keep)
        err, dx = 0.0, 0.0
        for i, (w, dy) in enumerate(zip(ws, dys)):
            a64, b64, dy64 = a[i].detach().double(), b[i].detach().double(), dy.double()
            xa = x64 @ a64.t()
            dxa = 2.0 * dy64 @ b64
            dx = dx + dy64 @ w.t() + (dxa @ a64) * keep
            err = max(err, rel(ys[i], x.detach().double() @ w + 2.0 * xa @ b64.t()), rel(grads[1 + i], dxa.t() @ x64),
                      rel(grads[1 + len(ws) + i], 2.0 * dy64.t() @ xa))
        err = max(err, rel(grads[0], dx))
        rows.append({"check": "siblings", "widths": widths, "dropout": p_drop, "rel_err": err, "ok": err < 1e-2})
    return rows


def check_launches(device, k, n) -> list[dict]:
    from gptqlora.kernels.lora_dropout import dropout_xa

    rows = []
    a = torch.randn(8, k, device=device, dtype=torch.bfloat16)
    flat = torch.randn(64 * k + 1, device=device, dtype=torch.bfloat16)  # [1:] starts 2 bytes off 16
    for name, x in (("aligned", torch.randn(64, k, device=device, dtype=torch.bfloat16)),
                    ("misaligned", flat[1:].view(64, k)),
                    ("aligned again", torch.randn(64, k, device=device, dtype=torch.bfloat16))):
        got = dropout_xa(x, a, 0.0001, 5)
        mask = dropout_mask(64, k, 0.0001, 5, device)
        want = (x.double() * mask / (1 - 0.0001)) @ a.double().t()
        e = rel(got, want)
        rows.append({"check": "launch", "input": name, "aligned": x.data_ptr() % 16 == 0, "rel_err": e,
                     "ok": e < 1e-2})
    return rows


def check_training(device, hidden, autocast, compiled: bool = False) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import gptqlora
    from gptqlora.adapters import GPTQLoraConfig
    from gptqlora.nn.quant_linear import QuantLinear
    from gptqlora.nn.skeleton import quantize_skeleton

    def losses(backend: str, dropout: float, siblings: bool = True, compile_: bool = False) -> tuple[list[float], bool]:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=2,
                          num_attention_heads=8, vocab_size=1024)
        model = quantize_skeleton(LlamaForCausalLM(cfg), 4, 128, device="cpu").to(device)
        g = torch.Generator(device=device).manual_seed(1)
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                k, nn_ = mod.in_features, mod.out_features
                q = packed(k, nn_, 4, 128, True, False, k + nn_, device)
                mod.qweight.copy_(q[0]); mod.qzeros.copy_(q[1]); mod.g_idx.copy_(q[3])  # noqa: E702
                mod.scales.copy_((1 + torch.rand(q[2].shape, device=device, generator=g)) / (8 * k ** 0.5))
                mod.kernel = backend
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        pm = gptqlora.get_peft_model(model, GPTQLoraConfig(lora_dropout=dropout, init_lora_weights="gaussian"))
        if not siblings:
            from gptqlora.adapters.siblings import unlink_siblings

            unlink_siblings(pm)
        if compile_:
            from gptqlora.train.compile import compile_blocks

            compile_blocks(pm)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
        ids = torch.randint(0, 1024, (4, 128), device=device, generator=torch.Generator(device=device).manual_seed(2))
        out, finite = [], True
        torch.manual_seed(3)
        for _ in range(5):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            finite &= all(torch.isfinite(p.grad).all().item() for p in pm.parameters() if p.requires_grad)
            opt.step()
            opt.zero_grad()
            out.append(float(loss))
        return out, finite

    kern, fin_k = losses("triton", 0.0)  # no dropout: the two paths draw different masks
    ref, fin_r = losses("torch", 0.0)
    single, fin_s = losses("triton", 0.0, siblings=False)  # q/k/v and gate/up layer by layer
    drop, fin_d = losses("triton", 0.05)
    diff = max(abs(a - b) / abs(b) for a, b in zip(kern, ref))
    diff_s = max(abs(a - b) / abs(b) for a, b in zip(kern, single))
    rec = {"check": "training", "triton_losses": kern, "reference_losses": ref, "max_rel_diff": diff,
           "single_layer_losses": single, "siblings_rel_diff": diff_s, "triton_dropout_losses": drop,
           "ok": fin_k and fin_r and fin_d and fin_s and diff < 1e-2 and diff_s < 1e-2 and kern[-1] < kern[0]
           and drop[-1] < drop[0]}
    if compiled:
        from torch._dynamo.utils import counters

        t = time.perf_counter()
        comp, fin_c = losses("triton", 0.0, compile_=True)
        comp_drop, fin_cd = losses("triton", 0.05, compile_=True)  # seeded dropout as ops, seed drawn in-graph
        diff_c = max(abs(a - b) / abs(b) for a, b in zip(comp, kern))
        breaks = sum(counters["graph_break"].values())
        rec.update(compiled_losses=comp, compiled_rel_diff=diff_c, compiled_graph_breaks=breaks,
                   compiled_dropout_losses=comp_drop, compiled_s=round(time.perf_counter() - t, 1),
                   ok=rec["ok"] and fin_c and fin_cd and diff_c < 1e-2 and breaks == 0 and comp_drop[-1] < comp_drop[0])
    return rec


def main(argv: list[str]) -> int:
    if "--cpu-smoke" in argv:  # small shapes in Triton's interpreter (TRITON_INTERPRET=1): tests this script
        device, shapes, (k, n), hidden, autocast = torch.device("cpu"), ((256, 128),), (256, 384), 256, False
    elif torch.cuda.is_available():
        device, shapes, (k, n), hidden, autocast = torch.device("cuda"), ((4096, 11008), (11008, 4096)), \
            (4096, 11008), 512, True
    else:
        sys.stderr.write("no CUDA device\n")
        return 1
    widths = ((k, 4), (k // 4, 4), (k // 2, 2))  # q, k, v of a GQA block (mixed bit widths allowed)
    rows = check_dequant(device, shapes) + check_layers(device, k, n) + check_group(device, k, widths) + \
        check_launches(device, k, n) + [check_training(device, hidden, autocast, "--compile" in argv)]
    bad = [r for r in rows if not r["ok"]]
    sys.stdout.write(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
                                 "torch": torch.__version__, "failed": bad}, indent=1) + "\n")
    layer_err = max(max(r["quant_matmul_rel_err"], r["quant_lora_rel_err"]) for r in rows if r["check"] == "layer")
    train = rows[-1]
    sys.stdout.write(f"gpu_check: {len(rows) - len(bad)}/{len(rows)} ok; dequant exact in "
                     f"{sum(r['ok'] for r in rows if r['check'] == 'dequant')} cases; worst layer rel err "
                     f"{layer_err:.2e}; training losses triton {train['triton_losses']} vs reference "
                     f"{train['reference_losses']} (max rel diff {train['max_rel_diff']:.1e}; siblings vs "
                     f"layer by layer {train['siblings_rel_diff']:.1e})" + (
                         f"; compiled {train['compiled_losses']} (rel diff {train['compiled_rel_diff']:.1e}, graph "
                         f"breaks {train['compiled_graph_breaks']}, {train['compiled_s']} s)"
                         if "compiled_losses" in train else "") + "\n")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
