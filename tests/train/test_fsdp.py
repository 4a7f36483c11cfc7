"""FSDP2 shards the packed base over two gloo ranks and trains exactly as one process does."""

import json
import os
import subprocess
import sys
import textwrap

import torch

import gptqlora
from gptqlora.adapters import GPTQLoraConfig
from gptqlora.nn.shardable import ShardableQuantLinear, make_shardable
from tiny import packed_tiny_llama, train_steps

CHILD = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    import gptqlora
    from gptqlora.adapters import GPTQLoraConfig
    from gptqlora.train.fsdp import shard_packed_model
    from tiny import packed_tiny_llama, train_steps
    pm = gptqlora.get_peft_model(packed_tiny_llama(bits=2, group_size=32), GPTQLoraConfig(r=4, lora_dropout=0.0))
    n = shard_packed_model(pm, init_device_mesh("cpu", (2,)))
    local = sum(p.to_local().numel() * 4 for name, p in pm.named_parameters() if name.endswith("_packed"))
    losses = train_steps(pm, steps=3)
    if dist.get_rank() == 0:
        print(json.dumps({"layers": n, "local_bytes": local, "losses": losses}))
    dist.destroy_process_group()
""")


def packed_bytes(model):
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers()
               if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"))


def test_shardable_layer_computes_what_the_packed_one_does():
    ref = gptqlora.get_peft_model(packed_tiny_llama(bits=2, group_size=32), GPTQLoraConfig(r=4, lora_dropout=0.0))
    pm = gptqlora.get_peft_model(packed_tiny_llama(bits=2, group_size=32), GPTQLoraConfig(r=4, lora_dropout=0.0))
    assert make_shardable(pm) == 14
    assert all(not p.requires_grad and p.dtype == torch.float32 for n, p in pm.named_parameters()
               if n.endswith("_packed"))
    assert sum(isinstance(m, ShardableQuantLinear) for m in pm.modules()) == 14 and packed_bytes(pm) == 0
    assert train_steps(pm) == train_steps(ref)


def test_fsdp2_on_two_gloo_ranks_halves_the_packed_base_and_trains_alike(tmp_path):
    ref_model = gptqlora.get_peft_model(packed_tiny_llama(bits=2, group_size=32), GPTQLoraConfig(r=4, lora_dropout=0.0))
    total = packed_bytes(ref_model)
    ref = train_steps(ref_model, steps=3)
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
                        str(child), tests], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["layers"] == 14
    assert out["local_bytes"] <= total / 2 + 14 * 4 * 4  # half of every packed tensor (a word of padding each)
    for got, want in zip(out["losses"], ref):
        assert abs(got - want) <= 1e-5 * abs(want)
