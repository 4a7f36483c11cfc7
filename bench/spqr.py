"""SpQR layer against the plain GPTQ layer (and bf16) on LLaMA-7B projection shapes, in one run.

    python bench/spqr.py                  # GPU: Triton dense path; prints a markdown table, --json OUT
    python bench/spqr.py --smoke          # CPU: small shapes, torch path, checks outputs, seconds

Per configuration, summed over the seven projections of one decoder block (q/k/v/o 4096x4096, gate/up
4096x11008, down 11008x4096):
  train   LoRA training step of the linears (r=8): forward + backward to the input and the adapter, bf16,
          `--tokens` rows, as GPTQLoraLinear runs it (GPTQ: the fused base+LoRA function; SpQR: its layer,
          one dequant kernel decoding the statistics + a CSR outlier-add kernel + matmul, then LoRA) -> tokens/s
  decode  batch-1 forward of the base layers (one token), timed inside a CUDA graph -> tokens/s of the
          linears alone (SpQR: the small-M kernel decoding the statistics per tile + CSR SpMV)
Configurations: bf16 nn.Linear; GPTQ 3-bit g128 and 4-bit g128 (act-order g_idx); SpQR 3-bit g16 with
3-bit statistics in groups of 16 and 1% fp16 outliers (3.945 bits per weight). Weights are random (speed
does not depend on their values). The acceptance ratio is SpQR train tokens/s over GPTQ 3-bit's (>= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

SHAPES_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
             "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}
SHAPES_SMOKE = {"q_proj": (256, 256), "up_proj": (256, 512), "down_proj": (512, 256)}


def gptq_layer(k: int, n: int, bits: int, group: int, device) -> nn.Module:
    from gptqlora.nn.quant_linear import QuantLinear

    g = torch.Generator(device=device).manual_seed(k * n + bits)
    layer = QuantLinear(k, n, bits, group, device=device)
    layer.qweight.random_(-2**31, 2**31 - 1, generator=g)
    layer.qzeros.random_(-2**31, 2**31 - 1, generator=g)
    layer.scales.copy_((torch.rand(layer.scales.shape, device=device, generator=g) * 0.01 + 1e-3).half())
    layer.g_idx.copy_((torch.arange(k, device=device, dtype=torch.int32) // group)[
        torch.randperm(k, device=device, generator=g)])
    return layer


def spqr_layer(k: int, n: int, bits: int = 3, group: int = 16, stat_bits: int = 3, stat_group: int = 16,
               outliers: float = 0.01, device="cpu", scale: float | None = None, seed: int = 0) -> nn.Module:
    """A SpQR layer with random codes. `scale` (for a whole model, bench/decode.py): the scales decode to
    about it, the zeros to about the codes' middle and the outliers to a few dense weights' size, so that
    activations stay O(1) through many layers; None: the layer-alone statistics below. `seed`: other contents."""
    from gptqlora.formats.gptq import pack_cols, pack_rows
    from gptqlora.formats.spqr import SpQRSpec, csr_from_mask
    from gptqlora.nn.spqr_linear import SpQRLinear

    g = torch.Generator(device=device).manual_seed(k * n + 7 + seed)
    gcount, s = k // group, n // stat_group
    codes = torch.randint(0, 2**bits, (k, n), device=device, generator=g)
    mask = torch.rand(n, k, device=device, generator=g) < outliers
    vals = torch.randn(n, k, device=device, generator=g) * (0.05 if scale is None else 2**bits * scale)
    v, c, r = csr_from_mask(mask, vals)
    rnd = lambda *shape: torch.rand(*shape, device=device, generator=g)  # noqa: E731
    if scale is None:
        s_step, s_base, z_step, z_base = rnd(gcount, s) * 1e-4, rnd(gcount, s) * 1e-3 + 1e-3, rnd(gcount, s) * 0.5, \
            rnd(gcount, s) * 2
    else:  # scale in [0.5, 1.6] x `scale`; zero = middle code -/+ 0.5 .. 1.5
        top = 2**stat_bits - 1
        s_step, s_base = rnd(gcount, s) * scale / top, (0.5 + 0.1 * rnd(gcount, s)) * scale
        z_step, z_base = rnd(gcount, s) * 2 / top, torch.full((gcount, s), (2**bits - 1) / 2 - 0.5, device=device)
    buffers = {"qweight": pack_rows(codes, bits), "g_idx": (torch.arange(k, device=device, dtype=torch.int32) // group)[
                   torch.randperm(k, device=device, generator=g)],
               "scales_code": pack_cols(torch.randint(0, 2**stat_bits, (gcount, n), device=device, generator=g), stat_bits),
               "scales_step": s_step.half(), "scales_base": s_base.half(),
               "zeros_code": pack_cols(torch.randint(0, 2**stat_bits, (gcount, n), device=device, generator=g), stat_bits),
               "zeros_step": z_step.half(), "zeros_base": z_base.half(),
               "outlier_values": v, "outlier_cols": c, "outlier_rows": r}
    return SpQRLinear(SpQRSpec(k, n, bits, group, stat_bits, stat_group), buffers)


def build(kind: str, k: int, n: int, device, dtype) -> nn.Module:
    if kind == "bf16":  # the dense peer, in the run's dtype (bf16 on the GPU)
        return nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
    if kind.startswith("gptq"):
        bits = int(kind[4])
        return gptq_layer(k, n, bits, 128, device)
    return spqr_layer(k, n, device=device)


def graph_timed(fn, device, reps: int) -> float:
    """Median seconds of fn() replayed inside a CUDA graph (a decode-size call runs for less time than its
    launches take on the host: eager timing measures the launcher); `timed` off CUDA or if not capturable."""
    if device.type == "cuda":
        import triton

        try:
            return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") / 1e3
        except Exception as e:
            sys.stderr.write(f"spqr.py: CUDA graph timing failed ({str(e)[:120]}); timing eagerly\n")
    return timed(fn, device, reps)


def timed(fn, device, reps: int) -> float:
    """Median seconds of fn() over reps, after two warm-up calls."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def lora_wrapped(base: nn.Module, dtype) -> nn.Module:
    """The base inside the adapter type users train (GPTQLoraLinear for packed, PEFT's Linear for bf16)."""
    from gptqlora.adapters import GPTQLoraConfig, get_peft_model

    holder = nn.Module()
    holder.proj = base
    dev = next(iter(base.buffers()), None)
    dev = dev.device if dev is not None else base.weight.device
    holder.anchor = nn.Parameter(torch.zeros(1, device=dev), requires_grad=False)  # PEFT reads a parameter's device
    pm = get_peft_model(holder, GPTQLoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["proj"],
                                               task_type=None))
    return pm.base_model.model.proj


def bench(kind: str, shapes: dict, tokens: int, device, dtype, reps: int, check: bool) -> dict:
    train_s = decode_s = 0.0
    for name, (k, n) in shapes.items():
        base = build(kind, k, n, device, dtype)
        layer = lora_wrapped(base, dtype)
        x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(tokens, n, device=device, dtype=dtype)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                y = layer(x)
            y.backward(gy)

        train_s += timed(step, device, reps)
        x1 = torch.randn(1, k, device=device, dtype=dtype)
        with torch.no_grad():
            decode_s += graph_timed(lambda: base(x1), device, reps * 4)
            if kind != "bf16":  # the layer's path (Triton on a GPU) dequantizes what the torch reference does
                w = base.dequantize(torch.float32)
                kernel, base.kernel = base.kernel, "torch"
                torch.testing.assert_close(w, base.dequantize(torch.float32), rtol=0, atol=0)
                base.kernel = kernel
                if check:
                    torch.testing.assert_close(base(x1.float()), x1.float() @ w, rtol=1e-3, atol=1e-3)
        del base, layer, x, gy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bits = {"bf16": 16.0, "gptq3": 3 + 19 / 128, "gptq4": 4 + 20 / 128, "spqr3": 3 + 6 / 16 + 64 / 256 + 0.32}[kind]
    return {"kind": kind, "avg_bits": round(bits, 3), "tokens": tokens, "train_ms": round(1e3 * train_s, 3),
            "train_tok_s": round(tokens / train_s), "decode_ms": round(1e3 * decode_s, 4),
            "decode_tok_s": round(1 / decode_s, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, small shapes, a few reps, checks outputs")
    p.add_argument("--tokens", type=int, default=None, help="rows per training step (default 8192; smoke 64)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; smoke 2)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes = SHAPES_SMOKE if args.smoke else SHAPES_7B
    tokens = args.tokens or (64 if args.smoke else 8192)
    reps = args.reps or (2 if args.smoke else 20)
    rows = [bench(kind, shapes, tokens, device, dtype, reps, check=args.smoke)
            for kind in ("bf16", "gptq3", "gptq4", "spqr3")]
    by = {r["kind"]: r for r in rows}
    ratio_train = by["spqr3"]["train_tok_s"] / by["gptq3"]["train_tok_s"]
    ratio_decode = by["spqr3"]["decode_tok_s"] / by["bf16"]["decode_tok_s"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    lines = [f"SpQR vs GPTQ layers, {name}, {'7B' if not args.smoke else 'smoke'} projection shapes, "
             f"{tokens} tokens per training step", "",
             "| layer | bits/weight | train step ms | train tokens/s | decode ms (batch 1) | decode tokens/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['avg_bits']} | {r['train_ms']} | {r['train_tok_s']} | {r['decode_ms']} | "
              f"{r['decode_tok_s']} |" for r in rows]
    lines += ["", f"SpQR train tokens/s / GPTQ 3-bit: {ratio_train:.3f} (target >= 0.8, i.e. within 1.25x)",
              f"SpQR decode tokens/s / bf16: {ratio_decode:.3f} (issue target >= 1.3)"]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows, "train_ratio_vs_gptq3": ratio_train,
                       "decode_ratio_vs_bf16": ratio_decode}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
