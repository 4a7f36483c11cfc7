"""One device call: check the CUDA path against the float64 reference, then time it.

    python bench/gpu_check.py            (on a machine with a CUDA GPU; writes a table to stdout)

1. correctness: QuantLinear forward/backward on CUDA (fp16 and bf16 activations, 2/3/4/8 bit, act-order)
   against a float64 CPU reference of the same dequantized weights;
2. training: a few GPTQ-LoRA steps of a tiny random LLaMA on CUDA with bf16 autocast and gradient
   checkpointing (finite loss, finite LoRA grads);
3. timing: the torch reference path (dequantize + matmul) of one quantized linear, forward and
   forward+backward, against a bf16 torch.matmul of the same shape measured in the same run.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.quant.quantizer import rtn


def make_layer(k: int, n: int, bits: int, group_size: int, act_order: bool, device) -> QuantLinear:
    res = rtn(torch.randn(n, k), bits, group_size, sym=False)
    g_idx = res.g_idx[torch.randperm(k)] if act_order else res.g_idx
    return QuantLinear.from_codes(res.codes, res.scales, res.zeros, g_idx, group_size, bits).to(device)


def check_layers(device) -> list[dict]:
    rows = []
    for bits in (2, 3, 4, 8):
        for dtype in (torch.float16, torch.bfloat16):
            for act_order in (False, True):
                layer = make_layer(512, 384, bits, 64, act_order, device)
                x = torch.randn(4, 33, 512, device=device, dtype=dtype, requires_grad=True)
                y = layer(x)
                gy = torch.randn_like(y)
                y.backward(gy)
                w = layer.dequantize(torch.float64).cpu()  # (K, N)
                ref_y = x.detach().double().cpu() @ w
                ref_gx = gy.double().cpu() @ w.t()
                err_y = float((y.double().cpu() - ref_y).norm() / ref_y.norm())
                err_gx = float((x.grad.double().cpu() - ref_gx).norm() / ref_gx.norm())
                ok = err_y < 1e-2 and err_gx < 1e-2 and torch.isfinite(y).all().item()
                rows.append({"bits": bits, "dtype": str(dtype).split(".")[1], "act_order": act_order,
                             "rel_err_y": err_y, "rel_err_dx": err_gx, "ok": ok})
    return rows


def check_training(device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptqlora.adapters import GPTQLoraConfig, get_peft_model
    from gptqlora.nn.skeleton import quantize_skeleton

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512)
    model = LlamaForCausalLM(cfg).to(device, torch.float16)
    fp = {n: m.weight.detach().float().cpu() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_skeleton(model, 4, 64, device=device)
    for name, mod in model.named_modules():  # fill the skeleton with RTN codes of the random weights
        if isinstance(mod, QuantLinear):
            r = rtn(fp[name], 4, 64)
            q = QuantLinear.from_codes(r.codes, r.scales, r.zeros, r.g_idx, 64, 4).to(device)
            model.set_submodule(name, q)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    pm = get_peft_model(model, GPTQLoraConfig())
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 512, (4, 128), device=device)
    losses = []
    pm.train()
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads_ok = all(torch.isfinite(p.grad).all().item() for p in pm.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return {"losses": losses, "grads_finite": grads_ok, "loss_fell": losses[-1] < losses[0]}


def bench(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def time_layers(device) -> list[dict]:
    rows = []
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
        tokens = 4096
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(k, n, device=device, dtype=torch.bfloat16)
        peer_f = bench(lambda: x @ w)
        peer_fb = bench(lambda: (x @ w).backward(torch.ones(tokens, n, device=device, dtype=torch.bfloat16)))
        for bits in (2, 4):
            layer = make_layer(k, n, bits, 128, False, device)
            f = bench(lambda: layer(x))
            fb = bench(lambda: layer(x).backward(torch.ones(tokens, n, device=device, dtype=torch.bfloat16)))
            rows.append({"shape": f"{k}x{n}", "tokens": tokens, "bits": bits, "fwd_ms": f, "fwd_bwd_ms": fb,
                         "bf16_matmul_fwd_ms": peer_f, "bf16_matmul_fwd_bwd_ms": peer_fb})
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        sys.stderr.write("no CUDA device\n")
        return 1
    device = torch.device("cuda")
    torch.manual_seed(0)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    out["layers"] = check_layers(device)
    out["training"] = check_training(device)
    out["timing"] = time_layers(device)
    sys.stdout.write(json.dumps(out, indent=1) + "\n")
    bad = [r for r in out["layers"] if not r["ok"]]
    sys.stdout.write(f"correctness: {len(out['layers']) - len(bad)}/{len(out['layers'])} layer checks ok; "
                     f"training loss fell: {out['training']['loss_fell']}, grads finite: "
                     f"{out['training']['grads_finite']}\n")
    for r in out["timing"]:
        sys.stdout.write(f"{r['shape']:>11} {r['bits']}-bit ref path fwd {r['fwd_ms']:.3f} ms, fwd+bwd "
                         f"{r['fwd_bwd_ms']:.3f} ms | bf16 matmul fwd {r['bf16_matmul_fwd_ms']:.3f} ms, "
                         f"fwd+bwd {r['bf16_matmul_fwd_bwd_ms']:.3f} ms\n")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
