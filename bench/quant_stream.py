"""Quantize a model larger than the host memory it is allowed: a 13B-shaped random fp16 checkpoint through
the streaming driver (gptqlora/quant/driver.py) under a cap on the process's peak resident memory.

    python bench/quant_stream.py --out /tmp/qs                                  # GPU: all 40 blocks of 13B
    python bench/quant_stream.py --device cpu --layers 2 --nsamples 4 --seqlen 128 --out /tmp/qs   # CPU: a few

1. Writes the random checkpoint (LLaMA-13B shapes, N(0, 0.02) weights, fp16, 2 GB shards) into OUT/fp,
   generated tensor by tensor (it is never whole in memory); `--layers` cuts the depth.
2. Quantizes it with GPTQ (`--bits`, `--group_size`, act-order) on `--nsamples` random token windows of
   `--seqlen`, into OUT/q, timing each block and reading the process's peak resident memory (VmHWM)
   after each one. Past `--max_rss_gib` it stops with exit status 3: the cap is checked, not assumed.
Prints one JSON line (seconds per block, peak RSS, checkpoint sizes, GPU peak) and a short summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

GIB = 2**30
SHAPES = {  # LLaMA-1 shapes
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "tiny": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
}


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak_rss() -> None:
    """Restart VmHWM from the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write_random_checkpoint(out: Path, shape: str, layers: int | None, device: torch.device) -> int:
    """A LLaMA checkpoint of random fp16 weights, tensor by tensor, in 2 GB shards. Returns its bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptqlora.checkpoint.io import ShardedWriter

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, torch_dtype="float16", **dims)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, "2GB")
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shp in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.float16)
        else:
            t = torch.empty(shp, dtype=torch.float16, device=device).normal_(0, 0.02, generator=gen)
        writer.add(name, t)
    writer.close()
    cfg.save_pretrained(out)
    return writer.total_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder (OUT/fp: the random model, OUT/q: the output)")
    ap.add_argument("--shape", default="13b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="only this many decoder blocks (default: the shape's)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max_rss_gib", type=float, default=8.0, help="peak resident memory allowed (exit 3 past it)")
    ap.add_argument("--device", default="cuda", help="where GPTQ runs: cuda, or cpu (use --layers)")
    ap.add_argument("--keep", action="store_true", help="keep OUT/fp and OUT/q")
    a = ap.parse_args()
    import gptqlora.quant.driver as driver
    from gptqlora.checkpoint.config import QuantConfig

    device = torch.device(a.device)
    out = Path(a.out)
    fp, q = out / "fp", out / "q"
    for d in (fp, q):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    fp_bytes = write_random_checkpoint(fp, a.shape, a.layers, device)
    write_s = time.perf_counter() - t0
    rss_before = peak_rss()  # writing held one shard (2 GB) at a time
    reset_peak_rss()  # from here on, VmHWM is the quantization's own peak

    stamps: list[float] = []
    rss: list[int] = []
    load_block = driver._load_block

    def timed(*args, **kw):  # called as each block is read: the previous one is done
        stamps.append(time.perf_counter())
        rss.append(peak_rss())
        if rss[-1] > a.max_rss_gib * GIB:
            raise MemoryError(f"peak resident memory {rss[-1] / GIB:.2f} GiB passed --max_rss_gib {a.max_rss_gib}")
        return load_block(*args, **kw)

    driver._load_block = timed
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 32000, (1, a.seqlen), generator=gen) for _ in range(a.nsamples)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    try:
        report = driver.quantize_model(fp, q, QuantConfig(bits=a.bits, group_size=a.group_size, desc_act=True),
                                       samples, device=device, max_shard_size="2GB")
    except MemoryError as e:
        sys.stderr.write(f"quant_stream: {e}\n")
        return 3
    end = time.perf_counter()
    stamps.append(end)
    per_block = [round(b - a_, 2) for a_, b in zip(stamps, stamps[1:])]
    q_bytes = sum(f.stat().st_size for f in q.glob("*.safetensors"))
    peak = max(rss + [peak_rss()])
    rec = dict(shape=a.shape, layers=len(per_block), bits=a.bits, group_size=a.group_size, nsamples=a.nsamples,
               seqlen=a.seqlen, device=str(device), fp_checkpoint_gib=round(fp_bytes / GIB, 2),
               quantized_gib=round(q_bytes / GIB, 2), write_random_s=round(write_s, 1),
               quantize_s=round(end - t1, 1), seconds_per_block=per_block,
               median_block_s=sorted(per_block)[len(per_block) // 2], peak_rss_gib=round(peak / GIB, 2),
               rss_after_writing_gib=round(rss_before / GIB, 2), max_rss_gib=a.max_rss_gib,
               gpu_peak_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None,
               worst_block_rel_error=round(max(b["rel_output_error"] for b in report.blocks), 4),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               date=time.strftime("%Y-%m-%d"))
    print(json.dumps(rec))
    print(f"\n{a.shape} x {rec['layers']} blocks ({rec['fp_checkpoint_gib']} GiB fp16 -> {rec['quantized_gib']} GiB "
          f"{a.bits}-bit) on {rec['gpu']}: {rec['median_block_s']} s per block (median), quantize "
          f"{rec['quantize_s']} s; peak host RSS {rec['peak_rss_gib']} GiB (cap {a.max_rss_gib})")
    if not a.keep:
        shutil.rmtree(fp, ignore_errors=True)
        shutil.rmtree(q, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
