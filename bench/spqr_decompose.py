"""Where SpQR's gap to fp16 comes from on man-page v2 (docs/results.md section 3, session 19): runs
scripts/spqr_vs_gptq.py for one configuration and seed (perplexity on test.txt), scores the same checkpoints on
val_heldout.txt, and appends one JSON line (command, seed, avg bits, log-ppl gaps) to --jsonl.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/spqr_decompose.py --name fp16stats-noout --seed 0 \
        --jsonl bench/results/spqr-decompose-2026-12-07.jsonl -- --stat-group 1 --outlier-fraction 0 --gptq-bits 3 \
        --gptq-group 16

Everything after `--` goes to spqr_vs_gptq.py. `--stat-group 1` stores each group's scale and zero in fp16 (a
second-level group of one channel: base = the value, step 0), i.e. unquantized statistics; the file pays 64 bits
per group and channel for it (avg_bits), while fp16 statistics proper would cost 2 * 16 / group_size bits
(`nominal_bits`). `--outlier-fraction 0`: no outliers.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from spqr_vs_gptq import perplexity  # noqa: E402

M = "bench/assets/manpage-llama-v2"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", required=True)
    p.add_argument("--out", default="/tmp/spqr_decompose")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    out = f"{a.out}/{a.name}_s{a.seed}"
    cmd = ["python", "scripts/spqr_vs_gptq.py", M, "--calibration", f"{M}/train.txt", "--eval", f"{M}/test.txt",
           "--out", out, "--nsamples", "64", "--seqlen", "256", "--windows", "400", "--device", "cpu",
           "--calibration-seed", str(a.seed), *rest]
    subprocess.run(cmd, check=True, cwd=ROOT)
    res = json.loads(Path(out, "results.json").read_text())
    rows = res["rows"]

    import gptqlora
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / M)
    ids = torch.tensor(tok(Path(ROOT / M / "val_heldout.txt").read_text())["input_ids"])
    val = {"fp16": perplexity(AutoModelForCausalLM.from_pretrained(ROOT / M, dtype=torch.float32).eval(), ids, 256,
                              400, torch.device("cpu"))}
    for name in ("gptq", "spqr"):
        model = gptqlora.load_quantized(Path(out, name), device="cpu", dtype=torch.float32).eval()
        val[name] = perplexity(model, ids, 256, 400, torch.device("cpu"))
        del model
    gptq_cfg = json.loads(Path(out, "gptq", "config.json").read_text())["quantization_config"]
    spqr_cfg = json.loads(Path(out, "spqr", "config.json").read_text())["quantization_config"]
    sb, sg, gs, b = (spqr_cfg["stat_bits"], spqr_cfg["stat_group_size"], spqr_cfg["group_size"], spqr_cfg["bits"])
    f = rows["spqr"].get("outlier_fraction", 0.0)
    rec = {
        "name": a.name, "seed": a.seed,
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=$PWD " + shlex.join(cmd)
                   + " ; val_heldout.txt scored on the same checkpoints by bench/spqr_decompose.py",
        "spqr": {"bits": b, "group_size": gs, "stat_bits": sb, "stat_group_size": sg, "outlier_fraction": f,
                 "avg_bits": rows["spqr"]["avg_bits"],
                 "nominal_bits": b + 32 / gs + 32 * f if sg == 1 else rows["spqr"]["avg_bits"]},
        "gptq": {"bits": gptq_cfg["bits"], "group_size": gptq_cfg["group_size"], "avg_bits": rows["gptq"]["avg_bits"]},
        "ppl_test": {k: v["ppl"] for k, v in rows.items()},
        "ppl_val_heldout": val,
        "log_gap_test": {k: math.log(rows[k]["ppl"] / rows["fp16"]["ppl"]) for k in ("gptq", "spqr")},
        "log_gap_val_heldout": {k: math.log(val[k] / val["fp16"]) for k in ("gptq", "spqr")},
    }
    with open(ROOT / a.jsonl, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec[k] for k in ("name", "seed", "log_gap_test", "log_gap_val_heldout")}),
          "spqr avg/nominal bits", rec["spqr"]["avg_bits"], rec["spqr"]["nominal_bits"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
