"""LoRA training-step throughput and peak memory on a LLaMA-shaped model with random weights, one
configuration per process (bench/train_suite.py runs the set and compares them in one run).

    python bench/train_step.py --mode gptq --bits 4 --group 128 --bs 16 --seq 256
    python bench/train_step.py --mode bf16            # peer: bf16 base, PEFT LoRA (the ceiling)
    python bench/train_step.py --mode nf4             # peer: bitsandbytes NF4 base, PEFT (QLoRA)

Every mode: LoRA r=8, alpha 16, dropout 0.05 on the seven projections, gradient checkpointing
(non-reentrant), bf16 autocast, AdamW; the median step after two warm-up steps. The GPTQ base is built
directly in packed form on the GPU (random codes, zeros, scales; act-order g_idx), so no fp16 model is
needed and a 65B shape fits; speed and memory do not depend on the weights' values. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "micro": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),  # CPU smoke tests
    "tiny": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(shape: str) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    return cfg


def build_dense(shape: str, nf4: bool, device) -> nn.Module:
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config(shape))
    torch.set_default_dtype(torch.float32)
    if nf4:
        import bitsandbytes as bnb

        for name, lin in list(model.named_modules()):
            if isinstance(lin, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True, device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(device)
                model.set_submodule(name, q)
        torch.cuda.empty_cache()
    return model


def meta_llama(shape: str) -> tuple[LlamaConfig, nn.Module]:
    """(config, a bf16 LlamaForCausalLM of `shape` on the meta device): its projections are then replaced by
    packed layers before `to_empty`, so no dense copy of the model is ever made."""
    cfg = config(shape)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return cfg, model


def init_dense(mod: nn.Module, gen: torch.Generator) -> None:
    """Random weights for a dense part of a model made by `to_empty` (embeddings and lm_head N(0, 0.02),
    RMSNorm 1); anything else is left alone."""
    if isinstance(mod, (nn.Embedding, nn.Linear)):
        mod.weight.data.normal_(0, 0.02, generator=gen)
    elif "RMSNorm" in type(mod).__name__:
        mod.weight.data.fill_(1.0)


def fresh_rotary(model: nn.Module, cfg: LlamaConfig, device) -> None:
    """`to_empty` left the rotary embedding's inv_freq buffer uninitialised: made again on `device`."""
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)


def build_gptq(shape: str, bits: int, group: int, device, act_order: bool = True) -> nn.Module:
    """A `shape` LLaMA with every projection a QuantLinear of random codes; act-order (a random g_idx row
    order shared by the projections that share an input, as GPTQ gives them) unless `act_order` is False."""
    from gptqlora.nn.quant_linear import QuantLinear
    from gptqlora.nn.skeleton import quantize_skeleton

    cfg, model = meta_llama(shape)
    quantize_skeleton(model, bits, group, device="meta")
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    perms = {}  # one act-order row order per (parent, input width), as GPTQ gives siblings that share an input
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            mod.qweight.random_(-2**31, 2**31 - 1, generator=gen)
            mod.qzeros.random_(-2**31, 2**31 - 1, generator=gen)
            k = mod.in_features
            mod.scales.fill_(1.0 / (math.sqrt(k) * 2 ** (bits - 1)))  # activations stay O(1)
            g = group if group > 0 else k
            key = (name.rpartition(".")[0], k)
            if key not in perms:
                perms[key] = torch.randperm(k, device=device, generator=gen)
            perm = perms[key] if act_order else torch.arange(k, device=device)
            mod.g_idx.copy_((torch.arange(k, device=device, dtype=torch.int32) // g)[perm])  # act-order
        else:
            init_dense(mod, gen)
    fresh_rotary(model, cfg, device)
    return model


def wrap(model: nn.Module, a) -> nn.Module:
    model.config.use_cache = False
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if a.liger:
        from gptqlora.train.liger import apply_liger

        apply_liger(model, "on", blocks=not a.compile)  # compiled blocks: Liger's loss only (train/liger.py)
    if a.mode == "gptq":
        import gptqlora
        from gptqlora.adapters import GPTQLoraConfig

        for mod in model.modules():
            if hasattr(mod, "kernel"):
                mod.kernel = a.kernel
        model = gptqlora.get_peft_model(model, GPTQLoraConfig(r=8, lora_alpha=16, lora_dropout=a.lora_dropout,
                                                              target_modules=TARGETS))
        if not a.siblings:
            from gptqlora.adapters.siblings import unlink_siblings

            unlink_siblings(model)
        if not a.fused:
            from gptqlora.adapters.layer import GPTQLoraLinear

            GPTQLoraLinear._fused_adapter = lambda self, kwargs: None
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=a.lora_dropout, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--mode", default="gptq", choices=("bf16", "nf4", "gptq"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lora_dropout", type=float, default=0.05)
    ap.add_argument("--kernel", default="auto", choices=("auto", "triton", "torch"), help="gptq dequant backend")
    ap.add_argument("--no-fused", dest="fused", action="store_false", help="gptq: PEFT's generic LoRA path")
    ap.add_argument("--no-siblings", dest="siblings", action="store_false",
                    help="gptq: q/k/v and gate/up layer by layer instead of one fused call each")
    ap.add_argument("--slow-launch", action="store_true", help="gptq: Triton's own kernel launch path "
                    "(GPTQLORA_FAST_LAUNCH=0) instead of kernels/launch.py's")
    ap.add_argument("--liger", action="store_true", help="Liger's RMSNorm/SwiGLU/RoPE/fused linear+CE")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder block (any mode; "
                    "gptqlora.train.compile, what finetune --compile blocks does); the first steps compile")
    ap.add_argument("--profile", action="store_true", help="also print the top CUDA kernels of one step")
    ap.add_argument("--host-profile", action="store_true",
                    help="also profile the host side of two steps: Python functions by own time (cProfile), "
                         "kernel launches per step, and GPU-busy time against wall time")
    ap.add_argument("--copy-sources", action="store_true",
                    help="also profile one step and list where its device-to-device copies come from (the op "
                         "that launched them, its input shapes and the Python frames outside torch)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (--shape tiny)")
    a = ap.parse_args()
    if a.slow_launch:
        import os

        os.environ["GPTQLORA_FAST_LAUNCH"] = "0"
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)  # LoRA init, dropout and the tokens: two processes of one config do the same work
    t0 = time.perf_counter()
    model = build_gptq(a.shape, a.bits, a.group, device) if a.mode == "gptq" else \
        build_dense(a.shape, a.mode == "nf4", device)
    model = wrap(model, a)
    if a.compile:
        from gptqlora.train.compile import compile_blocks

        compile_blocks(model)
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    x = torch.randint(0, 32000, (a.bs, a.seq), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, losses = [], []
    for _ in range(a.steps + 2):  # the first two are not counted (Triton's and inductor's compilation)
        sync()
        t = time.perf_counter()
        losses.append(step().detach())  # detached: float() of a tensor that requires grad warns (read after timing)
        sync()
        times.append(time.perf_counter() - t)
    med = sorted(times[2:])[len(times[2:]) // 2]
    label = a.mode if a.mode != "gptq" else f"gptq{a.bits}-g{a.group}"
    label += ("+liger-loss" if a.compile else "+liger") * a.liger + ("" if a.fused or a.mode != "gptq" else "-unfused") + \
        ("-torchref" if a.kernel == "torch" else "") + "-nosiblings" * (not a.siblings) + \
        "-slowlaunch" * a.slow_launch + "+compile" * a.compile + ("-nockpt" if not a.checkpointing else "")
    rec = dict(shape=a.shape, mode=label, bs=a.bs, seq=a.seq, step_s=round(med, 4), tokens_per_s=round(a.bs * a.seq / med),
               weights_gib=round(weights_gib, 2), first_steps_s=[round(v, 2) for v in times[:2]],
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, 2),
               trainable=sum(p.numel() for p in params), build_s=round(build_s, 1),
               losses=[round(float(v), 4) for v in losses], loss_finite=all(math.isfinite(float(v)) for v in losses),
               gpu=torch.cuda.get_device_name() if cuda else "cpu", date=time.strftime("%Y-%m-%d"))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        rec["profile"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30,
                                                   max_name_column_width=70)
    if a.mode == "gptq":  # compiled kernels kept by the fast launch path (a large count would mean key misses)
        from gptqlora.kernels import dequant, lora_dropout

        rec["fast_launch_keys"] = {k: len(getattr(m, k).cache) for m in (dequant, lora_dropout)
                                   for k in dir(m) if isinstance(getattr(m, k), dequant.FastKernel)}
    if a.host_profile:
        rec["host"] = host_profile(step, sync, cuda)
    if a.copy_sources:
        rec["copy_sources"] = copy_sources(step, sync, cuda)
    print(json.dumps(rec))


def copy_sources(step, sync, cuda: bool, top: int = 20) -> list[dict]:
    """The memory copies one step launches, grouped by the innermost op that launched them, its input shapes
    and the first Python frames outside torch's own package: count and GPU time per group, largest first."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=acts, record_shapes=True, with_stack=True) as prof:
        step()
        sync()
    def is_copy(k) -> bool:
        return k.name.lower().startswith(("memcpy", "memset"))

    groups: dict[tuple, list] = {}
    for e in prof.events():
        copies = [k for k in e.kernels if is_copy(k)]
        if not copies or any(is_copy(k) for c in e.cpu_children for k in c.kernels):
            continue  # none, or launched by a child op (counted there)
        frames = [f for f in (e.stack or []) if "/torch/" not in f][:5]
        key = (e.name, copies[0].name, str(e.input_shapes)[:160], " <- ".join(frames))
        g = groups.setdefault(key, [0, 0.0])
        g[0] += len(copies)
        g[1] += sum(k.duration for k in copies)
    rows = [dict(op=k[0], kind=k[1], shapes=k[2], frames=k[3], count=v[0], gpu_ms=round(v[1] / 1e3, 3))
            for k, v in groups.items()]
    return sorted(rows, key=lambda r: -r["gpu_ms"])[:top]


def host_profile(step, sync, cuda: bool) -> dict:
    """Where a host-bound step's wall time goes: cProfile's top functions by own time over two steps, the
    number of kernel launches per step and the GPU's busy time (sum of kernel times) against wall time."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    pr = cProfile.Profile()
    sync()
    pr.enable()
    for _ in range(2):
        step()
    sync()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(35)
    acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=acts) as prof:
        sync()
        t = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t
    ev = prof.key_averages()
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                   "cudaLaunchKernelExC"))
    gpu_us = sum(e.self_device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) \
        if cuda else 0.0
    top_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    # what makes the host wait for the GPU inside a step (each such wait serialises host and GPU work)
    waits = {e.key: e.count for e in ev if any(w in e.key for w in ("Synchronize", "_local_scalar_dense",
                                                                      "Memcpy", "cudaMalloc", "cudaFree"))}
    # the host's own time: enqueueing a step without waiting at its end (equal to the wall time when the
    # host, not the GPU, is the bottleneck and nothing inside the step waits for the GPU)
    sync()
    t = time.perf_counter()
    step()
    enqueue = time.perf_counter() - t
    sync()
    return dict(cprofile=buf.getvalue()[-9000:], launches=launches, gpu_busy_ms=round(gpu_us / 1e3, 1),
                profiled_wall_ms=round(wall * 1e3, 1), host_enqueue_ms=round(enqueue * 1e3, 1), waits=waits,
                top_cpu=top_cpu)


if __name__ == "__main__":
    main()
