"""Host work per fused GPTQ-LoRA layer call, measured on the CPU with the Triton launches stubbed out.

A CPU proxy for the host-bound 1x2048 training step on the GPU (docs/benchmarks.md, "Host work per layer
call"): the layers take the Triton path (TRITON_INTERPRET=1 lets it run on CPU tensors) but every Triton
launch (kernels/launch.py's FastKernel.launch) returns at once, so what is left is our Python, the torch ops
it dispatches and HF/PEFT's module calls on tiny tensors. Not a GPU measurement: on the GPU a launch also
costs a few microseconds of Triton/driver work, and the torch ops' own host time differs.

    python bench/host_ops.py                 # both parts, prints a table and one JSON line
    python bench/host_ops.py --profile       # also cProfile's top functions over the layer calls

Part 1, one decoder block's seven projections as the model calls them (q/k/v and gate/up as sibling
groups: 4 fused calls, 7 projections), bf16 autocast, fp32 LoRA weights (the GPU bench's setting), with
dropout 0.05 and 0: aten ops dispatched (counted under a TorchDispatchMode) and host microseconds, per
fused call, forward and backward. Part 2, a whole training step of a 2-block model ("micro" shape of
bench/train_step.py's builder at a smaller width, gradient checkpointing, AdamW): ops and host milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

# the script's folder leaves sys.path: a bench script named like a package would shadow it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: Triton's path on CPU tensors
os.environ.setdefault("GPTQLORA_KERNEL", "triton")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)  # the stubbed kernels leave their outputs uninitialised


def _train_step_module():
    """bench/train_step.py (its model builder), imported by path (bench/ is kept off sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_step", Path(__file__).resolve().parent / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


clock = time.thread_time  # this thread's CPU time: what the host spends, less what the other tenants of a
# shared machine take (wall time there varies by 2x between runs); all work here is on this one thread


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class CountCalls:
    """Python function calls (and calls of C functions from Python) while active: sys.setprofile's events,
    a count that does not depend on the machine's load."""

    def __enter__(self):
        self.n = 0

        def prof(frame, event, arg):
            if event in ("call", "c_call"):
                self.n += 1
        sys.setprofile(prof)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


def stub_launches() -> None:
    """Every Triton launch of our kernels becomes a no-op (outputs stay as allocated)."""
    from gptqlora.kernels.launch import FastKernel

    FastKernel.launch = lambda self, grid, args, kwargs: None


NANO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)  # ops ~ free


def build(shape: str, dropout: float, layers: int | None = None):
    import gptqlora
    from gptqlora.adapters import GPTQLoraConfig
    ts = _train_step_module()
    ts.SHAPES["nano"] = NANO

    model = ts.build_gptq(shape, 4, 32, torch.device("cpu"))
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
    model.config.use_cache = False
    pm = gptqlora.get_peft_model(model, GPTQLoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                       target_modules=ts.TARGETS))
    return pm.train()


def block_calls(block, h, h_o, h_d):
    """The seven projections of one decoder block as LLaMA calls them (q/k/v on one input, gate/up on one)."""
    a, m = block.self_attn, block.mlp
    q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
    g, u = m.gate_proj(h), m.up_proj(h)
    return q, k, v, a.o_proj(h_o), g, u, m.down_proj(h_d)


def per_call(shape: str, dropout: float, tokens: int, reps: int, profile: bool) -> dict:
    pm = build(shape, dropout, layers=1)
    block = pm.base_model.model.model.layers[0]
    hidden = block.self_attn.q_proj.in_features
    h, h_o = (torch.randn(1, tokens, hidden, requires_grad=True) for _ in range(2))
    h_d = torch.randn(1, tokens, block.mlp.down_proj.in_features, requires_grad=True)
    fused = 4  # q/k/v, o, gate/up, down: one autograd call each

    def fwd():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return block_calls(block, h, h_o, h_d)

    grads = [torch.randn_like(o) for o in fwd()]

    def bwd(outs):  # no glue ops: the outputs' gradients are made once
        torch.autograd.backward(outs, grads)

    params = [p for p in block.parameters() if p.requires_grad] + [h, h_o, h_d]

    def zero():  # as after optimizer.zero_grad(set_to_none=True): the first gradient is stored, not added
        for p in params:
            p.grad = None

    for _ in range(3):  # warm up (plans, caches)
        bwd(fwd())
        zero()
    with CountOps() as c_all:  # a step's first forward: the LoRA casts are made (the last backward dropped them)
        outs = fwd()
    with CountOps() as c_re:  # the recomputation under checkpointing: the casts are reused
        fwd()
    with CountOps() as c_b:
        bwd(outs)
    zero()
    with CountCalls() as py_f:
        outs = fwd()
    with CountCalls() as py_b:
        bwd(outs)
    zero()
    tf, tb = [], []
    for _ in range(reps):
        t = clock()
        outs = fwd()
        t1 = clock()
        bwd(outs)
        t2 = clock()
        zero()
        tf.append(t1 - t)
        tb.append(t2 - t1)
    rec = dict(dropout=dropout, tokens=tokens, fused_calls=fused, projections=7,
               fwd_ops_per_call=round(sum(c_all.ops.values()) / fused, 1),
               recompute_ops_per_call=round(sum(c_re.ops.values()) / fused, 1),
               bwd_ops_per_call=round(sum(c_b.ops.values()) / fused, 1),
               fwd_py_calls_per_call=round(py_f.n / fused, 1), bwd_py_calls_per_call=round(py_b.n / fused, 1),
               fwd_us_per_call=round(sorted(tf)[len(tf) // 2] / fused * 1e6, 1),
               bwd_us_per_call=round(sorted(tb)[len(tb) // 2] / fused * 1e6, 1),
               fwd_us_per_call_min=round(min(tf) / fused * 1e6, 1),
               bwd_us_per_call_min=round(min(tb) / fused * 1e6, 1),
               fwd_ops=dict(c_all.ops.most_common()), bwd_ops=dict(c_b.ops.most_common()))
    if profile:
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            bwd(fwd())
            zero()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
        print(buf.getvalue(), file=sys.stderr)
    return rec


def per_step(shape: str, dropout: float, tokens: int, reps: int) -> dict:
    pm = build(shape, dropout)
    model = pm.base_model.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with CountOps() as c:
        step()
    ts = []
    for _ in range(reps):
        t = clock()
        step()
        ts.append(clock() - t)
    return dict(dropout=dropout, tokens=tokens, blocks=len(model.model.layers), ops_per_step=sum(c.ops.values()),
                ms_per_step=round(sorted(ts)[len(ts) // 2] * 1e3, 2), ms_per_step_min=round(min(ts) * 1e3, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="nano", help="nano (hidden 64, the default: the ops' own work is "
                    "negligible) or a bench/train_step.py shape (micro, tiny)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--step-reps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ops", action="store_true", help="also print the aten ops per block, by name")
    a = ap.parse_args()
    stub_launches()
    calls = [per_call(a.shape, p, a.tokens, a.reps, a.profile) for p in (0.05, 0.0)]
    steps = [per_step(a.shape, p, a.tokens, a.step_reps) for p in (0.05, 0.0)]
    print("| dropout | fwd ops/call | recompute ops/call | bwd ops/call | fwd Python calls/call | bwd Python calls/call | fwd CPU us/call (median, min) | bwd CPU us/call (median, min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in calls:
        print(f"| {r['dropout']} | {r['fwd_ops_per_call']} | {r['recompute_ops_per_call']} | {r['bwd_ops_per_call']} | "
              f"{r['fwd_py_calls_per_call']} | {r['bwd_py_calls_per_call']} | "
              f"{r['fwd_us_per_call']}, {r['fwd_us_per_call_min']} | {r['bwd_us_per_call']}, {r['bwd_us_per_call_min']} |")
    print("| dropout | step ops (2 blocks) | step CPU ms (median, min) |")
    print("|---|---|---|")
    for r in steps:
        print(f"| {r['dropout']} | {r['ops_per_step']} | {r['ms_per_step']}, {r['ms_per_step_min']} |")
    if a.ops:
        for r in calls:
            print(r["dropout"], "fwd", r["fwd_ops"])
            print(r["dropout"], "bwd", r["bwd_ops"])
    for r in calls:
        r.pop("fwd_ops"), r.pop("bwd_ops")
    print(json.dumps(dict(shape=a.shape, per_call=calls, per_step=steps, torch=torch.__version__, date=time.strftime("%Y-%m-%d"))))


if __name__ == "__main__":
    main()
