"""Decode speed: GPTQ 2/3/4-bit with a LoRA adapter against bf16, in one process, a table last.

    python bench/gpu_check_decode.py && python bench/decode.py [--json OUT.json]     (H200: < 8 minutes)
    TRITON_INTERPRET=1 python bench/decode.py --device cpu --shape micro              (smoke test)
    python bench/decode.py --skip layers --bits 3,spqr3 --batches 1 --no-old-harness   (SpQR against GPTQ, bf16)

1. copy: a device-to-device copy's bandwidth (bytes read + written), the ceiling for the figures below;
2. layers: one linear of each 7B shape (q/k/v/o 4096x4096, gate/up 4096x11008, down 11008x4096) at
   M = 1 and 8 tokens: the small-M kernel (act-order group 128, group 64 at 2 bit; with and without a fused
   r=8 LoRA; act-order as the repacked copy and as the per-row gather) against a bf16 `x @ W`. Layers
   rotate through more than L2 holds, so every call reads from HBM. Bytes/s counts the packed weight,
   scales, zeros (and the LoRA A, B) once;
3. generation: tokens/s at batch 1 and 8 of a 7B-shaped LLaMA (random weights built in packed form, as
   bench/train_step.py does) with an r=8 adapter on the seven projections, through the harness
   `gptqlora chat/generate --decode compiled` use (gptqlora/graph_decode.py: static KV cache, the step
   compiled and captured in one CUDA graph); the bf16 model (no adapter: an adapter merged into bf16 costs
   nothing) in the same harness; and plain transformers `generate` in bf16 (dynamic cache, no compile), what a user gets without us. Decode
   tokens/s = batch x (new - 1) / (t(new tokens) - t(1 token)): the prefill cancels. The weight-read
   bandwidth of a step is the model's weight bytes / the batch-1 step time. At batch 1 also transformers'
   own compiled generate (static cache, compile_config with CUDA graphs), the harness before graph_decode.
   `--bits spqr3` adds a SpQR model (issue 17: 3-bit codes in groups of 16, 3-bit statistics in groups of 16,
   1% fp16 outliers, bench/spqr.py's layer) with the same adapter; its one-token calls take the small-M kernel
   in SpQR mode, the adapter fused in, plus a CSR SpMV per projection. Rows carry avg_bits.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

# bench/ must not shadow packages (a bench script named like a package, e.g. `kernels`, would stand in for
# the one transformers looks for): take the bench modules by their paths and drop bench/ from the import path.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_step = _bench_module("train_step")
SHAPES, TARGETS, build_dense, build_gptq = train_step.SHAPES, train_step.TARGETS, train_step.build_dense, \
    train_step.build_gptq
gemv_sweep = _bench_module("gemv_sweep")  # its random packed layers and group sizes, not a copy of them
GROUP, packed_layer = gemv_sweep.GROUP, gemv_sweep.packed_layer
spqr_layer = _bench_module("spqr").spqr_layer  # bench/spqr.py's SpQR layer (g16, 3-bit stats g16, 1% outliers)

from gptqlora.graph_decode import DECODERS  # noqa: E402
from gptqlora.kernels import gemv, gemv_m1, gemv_mma  # noqa: E402
from gptqlora.kernels.gemv import gemv_triton, plan_gemv  # noqa: E402
from gptqlora.nn import spqr_siblings  # noqa: E402



class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn, reps: int = 20) -> float:
        """Median milliseconds of fn: on CUDA its launches captured in a CUDA graph and the replays timed
        (a decode-size kernel runs for less time than the host takes to launch it: timing eager launches
        back to back measures the launcher, as the first GPU run of this script did); else a few calls."""
        if self.cuda:
            import triton

            try:
                return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")
            except Exception as e:  # not capturable: eager launches (launch-bound at decode sizes)
                sys.stderr.write(f"decode.py: CUDA graph timing failed ({str(e)[:120]}); timing eagerly\n")
                return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
        fn()
        t = time.perf_counter()
        for _ in range(2):
            fn()
        return (time.perf_counter() - t) / 2 * 1e3


def copy_gbps(device, timer: Timer, nbytes: int) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = timer.ms(lambda: b.copy_(a))
    return 2 * nbytes / t / 1e6


def layer_rows(device, timer: Timer, shape: str, copy: float, bits_list, ms_list, l2_bytes: int) -> list[dict]:
    h, inter = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
    rows = []
    for k, n in ((h, h), (h, inter), (inter, h)):
        dense_copies = max(1, math.ceil(l2_bytes / (k * n * 2)))
        dense = [torch.randn(k, n, device=device, dtype=torch.bfloat16) for _ in range(dense_copies)]
        for bits in bits_list:
            packed_bytes = k * n * bits // 8 + (k // GROUP[bits]) * n * (2 + bits / 8)
            copies = max(1, math.ceil(l2_bytes / packed_bytes))
            layers = [packed_layer(k, n, bits, device, i) for i in range(copies)]
            plans = {rp: [plan_gemv(p[0], p[3], bits, GROUP[bits], rp) for p in layers] for rp in (True, False)}
            a = torch.randn(8, k, device=device, dtype=torch.bfloat16) * 0.01
            b = torch.randn(n, 8, device=device, dtype=torch.bfloat16) * 0.01
            for m in ms_list:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                t_bf16 = timer.ms(lambda: [x @ w for w in dense]) / dense_copies
                for variant, repack, lora in (("repacked", True, False), ("repacked+lora", True, True),
                                              ("gather", False, False)):
                    ps = plans[repack]
                    t = timer.ms(lambda: [gemv_triton(x, *p, bits, pl, a if lora else None, b if lora else None)
                                          for p, pl in zip(layers, ps)]) / copies
                    nbytes = packed_bytes + (lora * 2 * 8 * (k + n)) + (4 * k if repack else 0)
                    rows.append({"shape": f"{k}x{n}", "bits": bits, "m": m, "variant": variant, "us": round(t * 1e3, 1),
                                 "bf16_us": round(t_bf16 * 1e3, 1), "speedup": round(t_bf16 / t, 2),
                                 "gbps": round(nbytes / t / 1e6), "pct_copy": round(100 * nbytes / t / 1e6 / copy, 1)})
            del layers, plans
        del dense
        gc.collect()
    return rows


def weight_bytes(model) -> int:
    """Bytes a decode step reads at batch 1: packed weights, scales, zeros (SpQR: all its tensors), the dense
    parameters."""
    from gptqlora.formats.spqr import SPQR_TENSORS
    from gptqlora.nn.quant_linear import QuantLinear
    from gptqlora.nn.spqr_linear import SpQRLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in (mod.qweight, mod.qzeros, mod.scales))
        elif isinstance(mod, SpQRLinear):  # g_idx counts for the act-order copy's perm (int32 [K]) read instead
            total += sum(getattr(mod, name).numel() * getattr(mod, name).element_size() for name in SPQR_TENSORS)
    # the embedding is not read per token (one row); lm_head, norms and the LoRA weights are
    total += sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return total


def average_bits(model) -> float:
    """Storage bits per weight of the quantized projections (GPTQ: codes + fp16 scale and packed zero per
    group; SpQR: its layers' own count), over all of them; 16 for a model without any."""
    from gptqlora.nn.quant_linear import QuantLinear
    from gptqlora.nn.spqr_linear import SpQRLinear

    bits = weights = 0
    for mod in model.modules():
        if isinstance(mod, (QuantLinear, SpQRLinear)):
            n = mod.in_features * mod.out_features
            group = mod.group_size if mod.group_size != -1 else mod.in_features
            bits += n * (mod.average_bits if isinstance(mod, SpQRLinear) else mod.bits + (16 + mod.bits) / group)
            weights += n
    return bits / weights if weights else 16.0


def _generator(model, harness: str, ids: torch.Tensor, prompt: int, new: int):
    """A function generating `n` new tokens for `ids` through one harness:
    "same harness": graph_decode (what `gptqlora chat/generate --decode compiled` run: static cache, the
    step compiled and captured in one CUDA graph); "transformers compiled": transformers' generate with a
    static cache and its compile_config (the harness before graph_decode); "plain transformers": generate,
    dynamic cache, no compile."""
    from gptqlora.graph_decode import decoder_for
    from gptqlora.inference import cache_length, prepare_decode

    mask = torch.ones_like(ids)
    if harness == "same harness":
        prepare_decode(model, ids.shape[0])
        dec = decoder_for(model, ids.shape[0], cache_length(model, prompt + new))
        return lambda n: dec.run(ids, mask, n, [], 0, sample=False)
    extra = {"disable_compile": True}
    if harness == "transformers compiled":
        from transformers import CompileConfig

        prepare_decode(model, ids.shape[0])
        extra = {"cache_implementation": "static", "max_cache_len": cache_length(model, prompt + new),
                 "compile_config": CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")}
    return lambda n: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=0, eos_token_id=None, **extra)


def decode_rate(model, batch: int, prompt: int, new: int, harness: str, timer: Timer, device) -> float:
    """Decode tokens/s: batch x (new - 1) / (t(new) - t(1))."""
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), device=device, generator=gen)
    make = _generator(model, harness, ids, prompt, new)

    def run(n: int) -> float:
        timer.sync()
        t = time.perf_counter()
        with torch.inference_mode():
            make(n)
        timer.sync()
        return time.perf_counter() - t

    run(new)  # compiles (first shape) and records the CUDA graphs
    run(1)
    t_new = min(run(new) for _ in range(2))
    t_one = min(run(1) for _ in range(2))
    return batch * (new - 1) / (t_new - t_one) if t_new > t_one else float("nan")  # nan: timing noise (CPU)


def step_profile(model, batch: int, prompt: int, new: int, device, top: int = 12) -> list[dict]:
    """Where a decode step's time goes: one graph_decode generate of `new` tokens under torch.profiler
    (after the timed runs: graphs recorded), kernels by total device time per generated token, and the
    wall time per token beside it (inflated by the profiler; the timed rows give the true rate)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device, generator=gen)
    make = _generator(model, "same harness", ids, prompt, new)
    with torch.inference_mode():
        make(new)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        t = time.perf_counter()
        make(new)
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    events.sort(key=lambda e: -e.device_time_total)
    return [{"kernel": e.key[:90], "calls_per_token": round(e.count / new, 1),
             "us_per_token": round(e.device_time_total / new, 1), "share": round(e.device_time_total / total, 3)}
            for e in events[:top]] + [{"kernel": "(all kernels)", "us_per_token": round(total / new, 1),
                                       "wall_us_per_token": round(wall * 1e6 / new, 1)}]


# "spqrmix": session 25's 3.994-bit SpQR (docs/results.md section 3): a 4-bit base in groups of 64, q_proj and
# k_proj at 3 bits in groups of 128, 0.01% outliers; (bits, group, outlier fraction) by projection name
MIX = {"q_proj": (3, 128, 1e-4), "k_proj": (3, 128, 1e-4)}
MIX_REST = (4, 64, 1e-4)


def build_spqr(shape: str, bits: int, device, mix: bool = False):
    """A LLaMA of `shape` whose seven projections are SpQR layers (bench/spqr.py's `spqr_layer`: group 16,
    3-bit statistics in groups of 16, 1% outliers; with `mix`, MIX's settings), built as train_step.build_gptq
    builds GPTQ ones: the model on the meta device, then each projection made on `device` (no dense copy of
    the model ever)."""
    cfg, model = train_step.meta_llama(shape)
    projections = [(name, mod.in_features, mod.out_features) for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    for name, _, _ in projections:  # placeholders: to_empty allocates nothing for them
        model.set_submodule(name, torch.nn.Identity())
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for mod in model.modules():
        train_step.init_dense(mod, gen)
    train_step.fresh_rotary(model, cfg, device)
    for name, k, n in projections:  # scale as build_gptq's (activations stay O(1)); seed: one per block, so
        block = int(name.split(".layers.")[1].split(".")[0])  # siblings share their act-order, as GPTQ's do
        b, group, frac = MIX.get(name.rsplit(".", 1)[-1], MIX_REST) if mix else (bits, 16, 0.01)
        model.set_submodule(name, spqr_layer(k, n, b, group=group, outliers=frac, device=device,
                                             scale=1.0 / (math.sqrt(k) * 2 ** (b - 1)), seed=block))
    return model


def build(kind: str, shape: str, device):
    """"bf16", "gptqB" (B bits, with an r=8 adapter), "gptqB-unfused" (every layer its own launch),
    "gptqB-inplace" / "gptqB-split" (built alike; generation_rows sends every one-token call it can to
    kernels/gemv_m1.py / none, to gemv.py's split-K kernel: the A/B of the one-token default), "gptqB-alt"
    (built alike; generation_rows has its kernels read the --alt-table configs); "gptqB-noact" (no act-order:
    g_idx in row order, so the kernel reads x without `perm`: what the permuted read of x costs in a whole
    model); "spqrB" (SpQR, B-bit codes, with the r=8
    adapter: `build_spqr`); "spqrmix" (session 25's 3.994-bit SpQR: MIX)."""
    if kind == "bf16":
        return build_dense(shape, False, device).eval()
    import gptqlora
    from gptqlora.adapters import GPTQLoraConfig

    kind, _, kernel = kind.partition("-")
    if kind == "spqrmix":
        model = build_spqr(shape, 4, device, mix=True)
    elif kind.startswith("spqr"):
        model = build_spqr(shape, int(kind.removeprefix("spqr")), device)
    else:
        bits = int(kind.removeprefix("gptq"))
        model = build_gptq(shape, bits, GROUP[bits], device, act_order=kernel != "noact")
    if device.type == "cpu":
        model = model.float()
    pm = gptqlora.get_peft_model(model, GPTQLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=TARGETS)).eval()
    if kernel not in ("", "unfused", "alt", "noact", "default", *KERNEL_ENV):
        raise ValueError(f"unknown decode kernel {kernel!r}")
    if kernel == "unfused":  # every layer its own launch (before q|k|v and gate|up shared one)
        from gptqlora.adapters.siblings import unlink_siblings

        unlink_siblings(pm)
    return pm


# a GPTQ kind's "-kernel" -> the environment it decodes under (see _decode_kernels; "alt" takes --alt-table's)
KERNEL_ENV = {"inplace": {gemv_m1.ENV: "inplace"}, "split": {gemv_m1.ENV: "split"}, "lorau": {gemv_m1.U_ENV: "1"},
              "mma": {gemv_mma.ENV: "1"}, "pdl": {gemv_mma.PDL_ENV: "1"}, "narrow": {gemv_mma.NARROW_ENV: "1"},
              "tail": {gemv_mma.TAIL_ENV: "1"}, "mmapdl": {gemv_mma.ENV: "1", gemv_mma.PDL_ENV: "1"},
              "mmareg": {gemv_mma.ENV: "1", gemv_mma.SSTATS_ENV: "0"},
              "mmadec": {gemv_mma.ENV: "1", gemv_mma.SSTATS_ENV: "1"},
              "mmaraw": {gemv_mma.ENV: "1", gemv_mma.SSTATS_ENV: "2"},
              "mmaopre": {gemv_mma.ENV: "1", gemv_mma.SSTATS_ENV: "2", gemv_mma.OPRE_ENV: "1"},
              "sib": {spqr_siblings.ENV: "1"},
              "l2": dict(zip(gemv_m1.L2_ENVS, os.environ.get("BENCH_L2", "16,end,1,0").split(","))),
              "l2self": {gemv_m1.SELF_ENV: "1"}}
# the kinds that leave the tensor-core kernel free (the others pin the Triton kernels)
UNPINNED = ("mma", "default", "pdl", "narrow", "tail", "mmapdl", "mmareg", "mmadec", "mmaraw", "mmaopre", "sib")


@contextlib.contextmanager
def _decode_kernels(kind: str, alt_table: str | None):
    """While a model of `kind` decodes: "-default" sets nothing (what gptqlora runs: from 2 rows the tensor-core
    kernel, gemv_mma.wanted); every other GPTQ or SpQR kind pins the Triton kernels (GPTQLORA_GEMV_MMA=0) unless it
    names another: "-inplace" / "-split" send its one-token calls to kernels/gemv_m1.py /
    gemv.py (GPTQLORA_GEMV_M1), "-mma" plans its layers for kernels/gemv_mma.py (GPTQLORA_GEMV_MMA=1), "-lorau"
    computes the adapter's u once per call (GPTQLORA_GEMV_LORA_U=1), "-pdl" is the default with the tensor-core
    kernel launched to overlap the u launch (GPTQLORA_GEMV_PDL=1), "-narrow" the default with 2-8 rows in 128-column
    blocks of the fewest splits (GPTQLORA_GEMV_NARROW=1), "-tail" the default with the last split summing 4 cells at
    once (GPTQLORA_GEMV_TAIL=1), "-mmapdl" the tensor-core kernel at every batch, one row too, overlapping the u
    launch (both), "-mmareg" the tensor-core kernel with SpQR's statistics held per lane in registers (at most 8
    groups a split; GPTQLORA_GEMV_SSTATS=0, session 21's kernel), "-mmadec" with their decoded values staged
    (GPTQLORA_GEMV_SSTATS=1, the default before session 24), "-mmaraw" with the block's raw statistics staged before
    their decode (GPTQLORA_GEMV_SSTATS=2, the default since), "-mmaopre" that with the outliers' offsets read before the
    block's barrier (GPTQLORA_GEMV_OPRE=1), "-sib" SpQR's default with its siblings (q|k|v, gate|up) in one launch
    each (GPTQLORA_SPQR_SIBLINGS=1), "-l2" the Triton kernels with each one-token launch asking L2 for the next
    launch's weights (GPTQLORA_L2_AHEAD and companions from $BENCH_L2 = "MB,end|start,evict_last 1|0,own
    evict_first 1|0[,own words first 1|0]", default "16,end,1,0"; bench/l2_ahead.py picks one), "-l2self"
    each program asking L2 for all of its own words before its loop (GPTQLORA_L2_SELF=1), "-alt" has the
    kernels read their configs from `alt_table` (GPTQLORA_GEMV_CONFIGS); the configs picked so far (cached per shape) are dropped on the way in and out. bf16: nothing."""
    kernel = kind.partition("-")[2]
    env = {gemv.TUNED_ENV: alt_table} if kernel == "alt" else dict(KERNEL_ENV.get(kernel, {}))
    if kind != "bf16" and kernel not in UNPINNED:
        env.setdefault(gemv_mma.ENV, "0")  # the Triton kernels at every batch (unset, batches of 2+ take gemv_mma)

    def fresh():
        gemv.tuned_table.cache_clear()
        gemv._CONFIGS.clear()
        gemv._M1_CONFIGS.clear()

    os.environ.update(env)
    if env:
        fresh()
    try:
        yield
    finally:
        for name in env:
            os.environ.pop(name, None)
        if env:
            fresh()


def generation_rows(device, timer, shape, bits_list, batches, prompt, new, copy, deadline,
                    profile_batch: int | None = None, kernels: tuple[str, ...] = ("triton",),
                    old_harness: bool = True, alt_table: str | None = None) -> list[dict]:
    """Batch by batch (batch 1 first: the headline figures come before the deadline can cut anything),
    one model at a time, each built fresh."""
    rows = []
    fast = device.type == "cuda"
    for batch in batches:
        kinds = [[b] if isinstance(b, str) else [f"gptq{b}" + ("" if k == "triton" else f"-{k}") for k in kernels]
                 for b in bits_list]  # SpQR ("spqr3"): its one decode path, --decode-kernels are GPTQ's
        for kind in ["bf16"] + [kind for ks in kinds for kind in ks]:
            label = kind + ("+lora r8" if kind != "bf16" else "")
            if time.time() > deadline:
                rows.append({"model": label, "harness": "skipped: over --budget-s", "batch": batch})
                continue
            model = build(kind, shape, device)
            wb, avg_bits = weight_bytes(model), round(average_bits(model), 3)
            harnesses = ["same harness"] + (["transformers compiled"] if fast and batch == 1 and old_harness else []) + \
                (["plain transformers"] if kind == "bf16" else [])
            with _decode_kernels(kind, alt_table):  # the A/Bs' kernel choice, for this model only
                for harness in harnesses:
                    from torch._dynamo.utils import counters

                    torch._dynamo.reset()  # each model compiles afresh: no recompile limit carried over
                    counters.clear()
                    tps = decode_rate(model, batch, prompt, new, harness, timer, device)
                    compiled = {"graph_breaks": sum(counters["graph_break"].values()),
                                "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
                                "unique_graphs": int(counters["stats"].get("unique_graphs", 0))}
                    if harness == "same harness":  # whether graph_decode captured its step (else it ran uncaptured)
                        compiled["cuda_graph"] = any(d.use_graph and bool(d.graphs)
                                                     for d in model.__dict__.get(DECODERS, {}).values())
                    step_gbps = wb * tps / batch / 1e9
                    ok = math.isfinite(tps)  # nan: the two timings too close to tell apart (CPU smoke runs)
                    rows.append({"model": label, "avg_bits": avg_bits, "harness": harness, "batch": batch,
                                 "tokens_per_s": round(tps, 1) if ok else None, "weight_gb": round(wb / 1e9, 2),
                                 "step_weight_gbps": round(step_gbps) if ok else None,
                                 "pct_copy": round(100 * step_gbps / copy, 1) if ok else None, **compiled})
                    print(rows[-1], flush=True)
                    if harness == "same harness" and batch == profile_batch and fast:
                        try:  # a diagnosis: its failure must not cost the rows after it
                            rows[-1]["profile"] = step_profile(model, batch, prompt, 16, device)
                        except Exception as e:
                            rows[-1]["profile"] = [{"kernel": f"profile failed: {type(e).__name__}: {e}"[:200]}]
                        for r in rows[-1]["profile"]:
                            print("   ", r, flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["model"] == "bf16" and r["harness"] == "same harness"}
    plain = {r["batch"]: r["tokens_per_s"] for r in rows if r.get("harness") == "plain transformers"}
    for r in rows:
        if r.get("tokens_per_s"):
            b = r["batch"]
            r["x_bf16_same_harness"] = round(r["tokens_per_s"] / base[b], 2) if base.get(b) else None
            r["x_plain_transformers"] = round(r["tokens_per_s"] / plain[b], 2) if plain.get(b) else None
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (--shape micro)")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--bits", default="2,3,4", help="comma-separated GPTQ bit widths, or spqrB for a SpQR model "
                    "(spqrmix: session 25's 3.994-bit mix, 4-bit g64 with q/k_proj 3-bit g128) "
                    "of B-bit codes through the Triton kernels, spqrB-default as gptqlora decodes it, spqrB-mma through "
                    "kernels/gemv_mma.py, spqrB-mmareg the same with its statistics in registers (session 21's "
                    "kernel), spqrB-mmadec with its decoded statistics staged (GPTQLORA_GEMV_SSTATS=1, the default "
                    "before session 24), spqrB-mmaraw with its raw statistics staged (GPTQLORA_GEMV_SSTATS=2, "
                    "the default since), spqrB-mmaopre that and the outliers' offsets early (GPTQLORA_GEMV_OPRE=1), "
                    "spqrB-sib with siblings in one launch "
                    "(GPTQLORA_SPQR_SIBLINGS=1) (generation only; "
                    "e.g. 3,spqr3; "
                    "default 2,3,4)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per timed generate (default 64)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: layers, generation")
    ap.add_argument("--budget-s", type=float, default=420, help="start no model after this many seconds")
    ap.add_argument("--profile", type=int, metavar="BATCH",
                    help="also profile one generate at this batch size per model (kernels by GPU time per token)")
    ap.add_argument("--decode-kernels", default="triton",
                    help="comma-separated, per GPTQ model: triton (kernels/gemv.py, q|k|v and gate|up one launch "
                         "each; one-token 2/4-bit calls through kernels/gemv_m1.py), unfused (the same, every layer its own launch: "
                         "the A/B), inplace (every one-token call gemv_m1.py serves, 8 bit too), split (none: gemv.py's "
                         "split-K kernel, the default before session 14), alt (triton with the configs of --alt-table), noact (triton on a "
                         "model without act-order: what x's permuted read costs), mma (the tensor-core CUDA kernel, "
                         "kernels/gemv_mma.py, for every call up to 16 tokens at 2/4 bit), lorau (triton with the "
                         "adapter's u computed once per call, GPTQLORA_GEMV_LORA_U=1), default (what gptqlora picks: "
                         "triton at batch 1, mma from batch 2), pdl (default, the tensor-core kernel overlapping the u launch: "
                         "GPTQLORA_GEMV_PDL=1), narrow (default, 2-8 rows in 128-column blocks of the fewest splits: "
                         "GPTQLORA_GEMV_NARROW=1), tail (default, the last split summing 4 cells at once: GPTQLORA_GEMV_TAIL=1), "
                         "mmapdl (mma overlapping the u launch, one row too); all but mma, default, pdl, narrow, tail and mmapdl pin the Triton kernels; default triton "
                         "(PyTorch's int4 kernel is measured per layer by bench/tinygemm_probe.py)")
    ap.add_argument("--no-old-harness", action="store_true",
                    help="skip transformers' own compiled generate at batch 1 (the harness before graph_decode)")
    ap.add_argument("--alt-table", help="a gemv config table (bench/gemv_sweep.py's JSON) for --decode-kernels alt")
    ap.add_argument("--json", help="write all rows here")
    a = ap.parse_args()
    if "alt" in a.decode_kernels.split(",") and not a.alt_table:
        ap.error("--decode-kernels alt needs --alt-table")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("bench/decode.py: no CUDA device; use --device cpu --shape micro for the smoke test\n")
        return 2
    t0 = time.time()
    timer = Timer(device)
    bits = [b if b.startswith("spqr") else int(b) for b in a.bits.split(",")]
    # the decode kinds a SpQR model takes
    spqr_kinds = ("", "default", "mma", "mmareg", "mmadec", "mmaraw", "mmaopre", "sib")
    for b in bits:
        width, _, kind = b.removeprefix("spqr").partition("-") if isinstance(b, str) else (str(b), "", "")
        if not (width.isdigit() or width == "mix") or kind not in spqr_kinds:
            ap.error(f"--bits {a.bits}: each entry a bit width, or spqrB[-KIND] / spqrmix[-KIND] with KIND one of "
                     f"{', '.join(k for k in spqr_kinds if k)} (none: the Triton kernels; e.g. spqr3)")
    batches = [int(b) for b in a.batches.split(",")]
    cuda = device.type == "cuda"
    copy = copy_gbps(device, timer, 2**30 if cuda else 2**24)
    l2 = 256 * 2**20 if cuda else 0
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "shape": a.shape, "copy_gbps": round(copy)}
    print(f"copy bandwidth: {copy:.0f} GB/s (read + write)", flush=True)
    if not cuda:
        sys.stderr.write("bench/decode.py: CPU smoke test (Triton's interpreter): figures mean nothing\n")
    gptq_bits = [b for b in bits if isinstance(b, int)]  # SpQR layers alone: bench/spqr.py
    if "layers" not in a.skip and gptq_bits:
        out["layers"] = layer_rows(device, timer, a.shape, copy, gptq_bits, batches, l2)
        print(table(out["layers"], list(out["layers"][0])), flush=True)
    if "generation" not in a.skip:
        out["generation"] = generation_rows(device, timer, a.shape, bits, batches, a.prompt, a.new, copy,
                                            t0 + a.budget_s, a.profile, tuple(a.decode_kernels.split(",")),
                                            not a.no_old_harness, a.alt_table)
    out["wall_s"] = round(time.time() - t0)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"\n{out['device']}, torch {out['torch']}, {out['date']}, {a.shape} shape, copy {copy:.0f} GB/s, "
          f"{out['wall_s']} s")
    if "generation" in out:
        print(table(out["generation"], ["model", "avg_bits", "harness", "batch", "tokens_per_s", "x_bf16_same_harness",
                                        "x_plain_transformers", "step_weight_gbps", "pct_copy", "cuda_graph",
                                        "unique_graphs", "graph_breaks", "cudagraph_skips"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
