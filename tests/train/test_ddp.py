"""Data-parallel finetune on CPU (2 processes, gloo): the same adapter as one process at the same global
batch, nothing of the packed base broadcast, one run folder, rank-0 saving, resume with two ranks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

# DDP's broadcasts, counted in each rank: only the LoRA weights, once, when DDP starts
CHILD = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    sent = []
    orig = dist._broadcast_coalesced
    def counting(group, tensors, *a, **k):
        sent.extend(t.numel() * t.element_size() for t in tensors)
        return orig(group, tensors, *a, **k)
    dist._broadcast_coalesced = counting
    from torch.nn.parallel import DistributedDataParallel as DDP
    init = DDP.__init__
    def record(self, module, *a, **k):
        init(self, module, *a, **k)
        synced = [n for n, _ in module.named_parameters() if n not in self.parameters_to_ignore]
        sizes = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if n in synced)
        report = os.environ["DDP_REPORT"] + f".{dist.get_rank()}"
        import atexit
        atexit.register(lambda: open(report, "w").write(json.dumps(
            {"synced": synced, "synced_bytes": sizes, "broadcast_bytes": sum(sent),
             "broadcast_buffers": self.broadcast_buffers, "world": dist.get_world_size()})))
    DDP.__init__ = record
    from gptqlora.cli import main
    sys.exit(main(sys.argv[1:]))
""")

COMMON = ["--micro_batch_size", "2", "--batch_size", "8", "--cutoff_len", "256", "--logging_steps", "1",
          "--learning_rate", "3e-3", "--warmup_steps", "0", "--lora_dropout", "0", "--seed", "3",
          "--save_steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from gptqlora.data.synthetic import string_records

    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in string_records(48, seed=1)))
    return p


def finetune(nproc, args, cwd, port, report=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_REPORT": str(report or cwd / "ddp")}
    child = cwd / "child.py"
    child.write_text(CHILD)
    # torchrun: what accelerate's multi-GPU launcher runs (accelerate launch --cpu wants mpirun for several)
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    r = subprocess.run([*(launch if nproc > 1 else [sys.executable]), str(child), "finetune", *COMMON, *args],
                       env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def adapter(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_two_ranks_train_the_adapter_one_rank_trains(tiny_run, data_file, tmp_path):
    base = ["--quant_checkpoint", str(tiny_run / "base"), "--data", str(data_file)]
    finetune(1, [*base, "--max_steps", "4", "--output_dir", str(tmp_path / "one")], tmp_path, 29620)
    # two ranks, no --output_dir: one folder under runs/, named by rank 0
    finetune(2, [*base, "--max_steps", "4"], tmp_path, 29621)
    (two,) = list((tmp_path / "runs").iterdir())
    a, b = adapter(tmp_path / "one"), adapter(two)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        # fp32 noise only: the all-reduce sums the ranks' gradients in another order, and Adam's normalisation
        # lifts last-bit differences of near-zero gradients (seen: 2.1e-6 on one of 2048 entries, machine-
        # dependent). A wrong reduction (a sum, not a mean; one rank's gradient) moves entries by ~lr = 3e-3.
        torch.testing.assert_close(b[k], a[k], rtol=2e-4, atol=2e-5)
    assert any(float((a[k]).abs().max()) > 0 for k in a if "lora_B" in k)  # trained: B starts at zero

    reports = [json.loads((tmp_path / f"ddp.{r}").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2 and rep["broadcast_buffers"] is False
        assert rep["synced"] and all("lora_" in n for n in rep["synced"])  # only LoRA gradients all-reduced
        assert rep["broadcast_bytes"] == rep["synced_bytes"]  # LoRA once at start; no packed buffer, ever
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    assert all((two / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)

    # resume with two ranks from checkpoint-2 of a copy: the same adapter as the uninterrupted run
    import shutil

    again = tmp_path / "again"
    shutil.copytree(two, again)
    shutil.rmtree(again / "checkpoints" / "checkpoint-4")
    shutil.rmtree(again / "adapter")
    r = finetune(2, [*base, "--max_steps", "4", "--output_dir", str(again), "--resume_from_checkpoint", "true"],
                 tmp_path, 29622, report=tmp_path / "resumed")
    c = adapter(again)
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-7)
    log = [json.loads(line) for line in (again / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x][-2:] == [3, 4]
