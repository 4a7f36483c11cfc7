"""SpQR against GPTQ on one model: perplexity next to fp16 at matched (or lower) bits, then GPTQ-LoRA on the
SpQR base, trained and merged to fp16. The issue-17 acceptance on a real-text model.

    python scripts/spqr_vs_gptq.py MODEL_DIR --calibration calib.txt --eval eval.txt --out results/spqr \
        [--train-data alpaca.json --max-steps 50] [--device cuda]

Writes OUT/gptq/ and OUT/spqr/ (the checkpoints), OUT/results.json and OUT/results.md, and prints the table:
fp16, GPTQ (--gptq-bits, g --gptq-group, act-order) and SpQR (--spqr-bits, group --spqr-group, 3-bit
statistics in groups of --stat-group, --outlier-fraction) perplexity on --eval (non-overlapping windows of
--seqlen tokens, at most --windows),
with each one's average bits per weight. --calibration-seed picks both calibrations' samples; --gptq-descent-passes,
--spqr-descent-passes and --spqr-flags give one side its own settings (SpQR's descent is opt-in). `spqr_closer` is
true when |ppl(SpQR) - ppl(fp16)| <= |ppl(GPTQ) - ppl(fp16)|. With --train-data, also trains a GPTQ-LoRA adapter on the SpQR base (`finetune
--quant_checkpoint`), merges it (`merge --to fp16`) and reports the merged model's perplexity.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path

import torch

log = logging.getLogger("spqr_vs_gptq")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, windows: int, device) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ids [T]."""
    nll, count = 0.0, 0
    for i in range(min(windows, max(1, (ids.numel() - 1) // seqlen))):
        x = ids[i * seqlen: (i + 1) * seqlen + 1].to(device)[None]
        logits = model(input_ids=x[:, :-1]).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
    return math.exp(nll / count)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="fp16/bf16 model (a real-text model: the acceptance is about text)")
    p.add_argument("--calibration", required=True, help="calibration data for both quantizations")
    p.add_argument("--eval", required=True, help="a .txt file for perplexity (not the calibration text)")
    p.add_argument("--out", required=True, help="output directory (created; its gptq/ and spqr/ are replaced)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048, help="calibration and evaluation window (tokens)")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows at most")
    p.add_argument("--gptq-bits", type=int, default=4)
    p.add_argument("--gptq-group", type=int, default=128)
    p.add_argument("--spqr-bits", type=int, default=3)
    p.add_argument("--spqr-group", type=int, default=16, help="SpQR first-level group size")
    p.add_argument("--stat-group", type=int, default=16, help="SpQR second-level (statistics) group size")
    p.add_argument("--outlier-fraction", type=float, default=0.01,
                   help="SpQR: 0.01 -> 3.945 bits per weight; 0: no outliers (--outlier-threshold inf)")
    p.add_argument("--calibration-seed", type=int, default=0, help="seed picking both quantizations' samples")
    p.add_argument("--gptq-descent-passes", type=int, default=None,
                   help="GPTQ's --descent-passes (default: the package's default)")
    p.add_argument("--spqr-descent-passes", type=int, default=None,
                   help="SpQR's --descent-passes (default: the package's default)")
    p.add_argument("--spqr-flags", default="", help="more quantize flags for SpQR only, e.g. '--no-refit-scales'")
    p.add_argument("--train-data", help="also train GPTQ-LoRA on the SpQR base on this file and merge it: "
                                        "Alpaca/CoT/chat JSON(L), or a .txt file (cut into --text-chars "
                                        "chunks, each an Alpaca record 'Continue the text.' -> chunk)")
    p.add_argument("--text-chars", type=int, default=800, help="chunk size of a .txt --train-data")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptqlora.cli import main as cli
    from gptqlora.devices import resolve_device

    device = resolve_device(args.device)
    dev = ["--device", str(device)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--calibration", args.calibration, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--calibration-seed", str(args.calibration_seed), "--overwrite", *dev]
    runs = {
        "gptq": ["--bits", str(args.gptq_bits), "--group-size", str(args.gptq_group), "--desc-act"],
        "spqr": ["--method", "spqr", "--bits", str(args.spqr_bits), "--group-size", str(args.spqr_group),
                 "--stat-bits", "3", "--stat-group-size", str(args.stat_group), "--desc-act",
                 *(["--outlier-fraction", str(args.outlier_fraction)] if args.outlier_fraction
                   else ["--outlier-threshold", "inf"])],
    }
    for name, passes in (("gptq", args.gptq_descent_passes), ("spqr", args.spqr_descent_passes)):
        if passes is not None:
            runs[name] += ["--descent-passes", str(passes)]
    runs["spqr"] += shlex.split(args.spqr_flags)
    for name, flags in runs.items():
        rc = cli(["quantize", args.model_dir, str(out / name), *flags, *common])
        if rc:
            return rc

    import gptqlora

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ids = torch.tensor(tok(Path(args.eval).read_text())["input_ids"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = {}
    fp = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device).eval()
    rows["fp16"] = {"ppl": perplexity(fp, ids, args.seqlen, args.windows, device), "avg_bits": 16.0}
    del fp
    for name in runs:
        model = gptqlora.load_quantized(out / name, device=device, dtype=dtype).eval()
        summary = json.loads((out / name / "quant_report.json").read_text())["summary"]
        rows[name] = {"ppl": perplexity(model, ids, args.seqlen, args.windows, device),
                      "avg_bits": summary["avg_bits"], **({"outlier_fraction": summary["outlier_fraction"]}
                                                          if "outlier_fraction" in summary else {})}
        del model
    if args.train_data:
        run_dir, merged = out / "lora-on-spqr", out / "lora-on-spqr-merged"
        data = args.train_data
        if data.endswith(".txt"):
            text = Path(data).read_text()
            data = str(out / "train-records.jsonl")
            n = args.text_chars
            Path(data).write_text("".join(json.dumps({"instruction": "Continue the text.", "output": text[i:i + n]})
                                          + "\n" for i in range(0, len(text), n)))
        rc = cli(["finetune", "--quant_checkpoint", str(out / "spqr"), "--data", data, "--output_dir",
                  str(run_dir), "--max_steps", str(args.max_steps), "--overwrite", *dev])
        if rc:
            return rc
        rc = cli(["merge", str(run_dir), "--to", "fp16", "--out", str(merged), "--overwrite"])
        if rc:
            return rc
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).to(device).eval()
        rows["spqr+lora merged"] = {"ppl": perplexity(m, ids, args.seqlen, args.windows, device), "avg_bits": 16.0}
    base = rows["fp16"]["ppl"]
    gap = {k: v["ppl"] - base for k, v in rows.items()}
    result = {"model": args.model_dir, "rows": rows, "gap_to_fp16": gap,
              "spqr_avg_bits_le_4": rows["spqr"]["avg_bits"] <= 4.0,
              "spqr_closer": abs(gap["spqr"]) <= abs(gap["gptq"])}  # closeness: |ppl - fp16 ppl|
    lines = [f"perplexity on {args.eval} ({args.model_dir})", "", "| model | avg bits | ppl | ppl - fp16 |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['avg_bits']:.3f} | {v['ppl']:.4f} | {gap[k]:+.4f} |" for k, v in rows.items()]
    verdict = "at least as close to fp16 as" if result["spqr_closer"] else "further from fp16 than"
    lines += ["", f"SpQR at {rows['spqr']['avg_bits']:.3f} bits is {verdict} GPTQ {args.gptq_bits}-bit "
                  f"g{args.gptq_group} ({rows['gptq']['avg_bits']:.3f} bits)"]
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
