"""The GPU benchmarks' CPU smoke modes run and print what they promise (the figures come from a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_scale_benchmark_smoke(tmp_path):
    out = _run([str(ROOT / "bench" / "scale.py"), "--device", "cpu", "--shape", "tiny", "--set", "smoke",
                "--batches", "2x32", "--steps", "1", "--out", str(tmp_path)], tmp_path)
    (rec,) = [json.loads(line) for line in (tmp_path / "scale.jsonl").read_text().splitlines()]
    assert rec["checkpointing"] == "selective 2/4" and rec["offload"] and rec["loss"] == "chunked"
    assert rec["tokens_per_s"] > 0 and rec["loss_finite"] and len(rec["losses"]) == 3
    assert set(rec["breakdown_gib"]) == {"weights", "optimizer", "grads", "blocks", "head+loss", "backward", "cache"}
    assert rec["breakdown_gib"]["optimizer"] > 0  # AdamW moments of the LoRA weights: 8 bytes each
    table = [ln for ln in out[out.index("| bits |"):].splitlines() if ln.startswith("|")]
    assert len(table) == 3 and "| 2 | 2x32 | selective 2/4 | chunked | offload |" in table[2]
