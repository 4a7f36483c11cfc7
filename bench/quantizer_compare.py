#!/usr/bin/env python
"""gptqlora's GPTQ against GPTQModel's, side by side: same model, same calibration tokens, same held-out
text, both checkpoints read by the same loader (gptqlora's; the interop tests pin that it reads GPTQModel's
exactly) and scored by the same perplexity code. Prints a markdown table of the log-perplexity gap over
the fp model and its ratio to GPTQModel's default, with the quantization time.

Needs GPTQModel (the interop venv) for its rows; without it only ours are measured.

    GPTQMODEL_CPU_WORKERS=2 TORCHDYNAMO_DISABLE=1 CUDA_VISIBLE_DEVICES="" PYTHONPATH=$PWD \\
        /work/venv-interop/bin/python bench/quantizer_compare.py --models tiny,manpage --out compare.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.append(str(Path(__file__).parent))  # after site-packages: a bench script must not shadow a package

import torch  # noqa: E402

from quality_models import SPECS, ModelSpec, fp_perplexity, quantized_perplexity  # noqa: E402

log = logging.getLogger("quantizer_compare")

# (bits, group_size, desc_act)
CONFIGS = [(2, 64, True), (3, 64, True), (4, 128, True), (2, 64, False), (3, 64, False), (4, 128, False)]
# ours: name -> QuantConfig overrides ("defaults" = whatever QuantConfig's defaults are today)
OURS = {
    "ours: damp .01": {"damp_percent": 0.01, "mse": False, "act_group_aware": False, "gptaq": 0.0},
    "ours: damp .05": {"damp_percent": 0.05, "mse": False, "act_group_aware": False, "gptaq": 0.0},
    "ours: damp .05 + mse": {"damp_percent": 0.05, "mse": True, "act_group_aware": False, "gptaq": 0.0},
    "ours: damp .1 + mse": {"damp_percent": 0.1, "mse": True, "act_group_aware": False, "gptaq": 0.0},
    "ours: damp .01 + mse": {"damp_percent": 0.01, "mse": True, "act_group_aware": False, "gptaq": 0.0},
    "ours: damp .05 + mse + GAR (previous default)": {"damp_percent": 0.05, "mse": True, "act_group_aware": True,
                                                      "gptaq": 0.0},
    "ours: defaults": {},  # today: damp .05 + mse + GAR + GPTAQ (alpha 1)
    "ours: defaults, no mse": {"mse": False},
    "ours: defaults + mse select": {"mse_select": True},
    "ours: defaults, no descent": {"descent_passes": 0},  # the default before coordinate descent
}
THEIRS = {"GPTQModel 7.7 default": {}, "GPTQModel 7.7 mse=2.4": {"mse": 2.4}}


def ours(spec: ModelSpec, out: Path, bits: int, gs: int, desc: bool, overrides: dict) -> None:
    from gptqlora.checkpoint.config import QuantConfig
    from gptqlora.quant.driver import quantize_model

    quantize_model(spec.model_dir, out, QuantConfig(bits=bits, group_size=gs, desc_act=desc, **overrides),
                   spec.calibration, device="cpu", progress=False)


def theirs(spec: ModelSpec, out: Path, bits: int, gs: int, desc: bool, overrides: dict) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=bits, group_size=gs, sym=True, desc_act=desc, pack_impl="original",
                          act_group_aware=False if desc else None, **overrides)
    m = GPTQModel.load(str(spec.model_dir), qcfg, device="cpu", dtype=torch.float32)
    calib = [{"input_ids": s[0].tolist(), "attention_mask": [1] * s.shape[1]} for s in spec.calibration]
    m.quantize(calib, batch_size=1)
    m.save(str(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,manpage")
    p.add_argument("--configs", default=None, help="e.g. 2:64:1,4:128:0 (bits:group:desc_act); default: all")
    p.add_argument("--variants", default=None, help="comma-separated names to run, or parts of names (default: "
                   "all)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", default="0", help="calibration seeds, comma-separated: each gives its own table "
                   "(the spread between them is the run-to-run noise)")
    p.add_argument("--merge", default=None, help="comma-separated JSON results of earlier runs (--out), added to "
                   "this run's in the summary over seeds; with --models '' only the summary is printed")
    p.add_argument("--ours", action="append", default=[], metavar="NAME=JSON",
                   help='an extra variant of ours, e.g. \'x={"mse": false}\' (QuantConfig overrides)')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    configs = CONFIGS if not args.configs else [
        tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    for extra in args.ours:
        name, _, js = extra.partition("=")
        OURS[f"ours: {name}"] = json.loads(js)
    try:
        import gptqmodel  # noqa: F401
        variants = {**{k: (ours, v) for k, v in OURS.items()}, **{k: (theirs, v) for k, v in THEIRS.items()}}
    except ImportError:
        print("GPTQModel not installed: measuring ours only", file=sys.stderr)
        variants = {k: (ours, v) for k, v in OURS.items()}
    if args.variants:
        keep = [v.strip() for v in args.variants.split(",")]
        # a full variant name selects that variant only, any other text every variant whose name holds it
        variants = {k: v for k, v in variants.items() if k in keep or any(s in k for s in keep if s not in variants)}
    results = []
    work = Path(tempfile.mkdtemp(prefix="qcompare-"))
    out_json = Path(args.out).resolve() if args.out else None
    merge = [Path(f).resolve() for f in (args.merge or "").split(",") if f]
    os.chdir(work)  # GPTQModel writes ./logs/*.log into the working directory
    try:
        for mname, seed in [(m, int(s)) for m in args.models.split(",") if m
                                for s in args.seeds.split(",")]:
            spec = SPECS[mname](args.nsamples, seed=seed)
            fp = fp_perplexity(spec)
            print(f"\n## {mname} (calibration seed {seed}): fp perplexity {fp['perplexity']:.3f} ({fp['tokens']} tokens, windows of "
                  f"{spec.seqlen}; calibration {len(spec.calibration)} x {spec.calibration[0].shape[1]})")
            for bits, gs, desc in configs:
                rows = {}
                for vname, (fn, overrides) in variants.items():
                    out = work / f"{mname}-{bits}-{gs}-{int(desc)}-{len(rows)}"
                    t = time.time()
                    fn(spec, out, bits, gs, bool(desc), overrides)
                    secs = time.time() - t
                    r = quantized_perplexity(out, spec)
                    shutil.rmtree(out, ignore_errors=True)
                    rows[vname] = {"perplexity": r["perplexity"], "gap": r["nll"] - fp["nll"], "seconds": secs}
                ref = rows.get("GPTQModel 7.7 default", {}).get("gap")
                print(f"\n{bits} bit, group {gs}, act-order {'on' if desc else 'off'}\n")
                print("| quantizer | perplexity | log-ppl gap | gap / GPTQModel default | seconds |")
                print("|---|---:|---:|---:|---:|")
                for vname, r in rows.items():
                    ratio = f"{r['gap'] / ref:.2f}" if ref else "-"
                    print(f"| {vname} | {r['perplexity']:.3f} | {r['gap']:.4f} | {ratio} | {r['seconds']:.1f} |")
                    results.append({"model": mname, "seed": seed, "bits": bits, "group_size": gs, "desc_act": bool(desc),
                                    "quantizer": vname, "fp_perplexity": fp["perplexity"], **r})
                sys.stdout.flush()
                if out_json:  # after every table: a stopped run keeps what it measured
                    out_json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out_json:
        out_json.write_text(json.dumps(results, indent=2))
    merged = {}
    for f in merge:  # earlier runs' results, then this run's
        for r in json.loads(f.read_text()):
            merged[(r["model"], r["bits"], r["group_size"], r["desc_act"], r["quantizer"], r["seed"])] = r
    for r in results:
        merged[(r["model"], r["bits"], r["group_size"], r["desc_act"], r["quantizer"], r["seed"])] = r
    summarize(list(merged.values()))
    return 0


def summarize(results: list[dict]) -> None:
    """Per model and config: each quantizer's gap for every seed, the mean over seeds, and the ratio of
    the summed gaps to GPTQModel's default (and mse) over the seeds both have (the noise between seeds is
    the size of the 3-4 bit gaps)."""
    gap = {(r["model"], r["bits"], r["group_size"], r["desc_act"], r["quantizer"], r["seed"]): r for r in results}
    keys = dict.fromkeys(k[:4] for k in gap)
    for key in keys:
        names = list(dict.fromkeys(k[4] for k in gap if k[:4] == key))
        seeds = sorted({k[5] for k in gap if k[:4] == key})
        got = {n: {s: gap[(*key, n, s)] for s in seeds if (*key, n, s) in gap} for n in names}

        def ratio(n: str, ref: str) -> str:
            common = [s for s in got[n] if s in got.get(ref, {})]
            den = sum(got[ref][s]["gap"] for s in common)
            return f"{sum(got[n][s]['gap'] for s in common) / den:.2f}" if common and den else "-"

        m, bits, gs, desc = key
        print(f"\n### {m}: {bits} bit, group {gs}, act-order {'on' if desc else 'off'}\n")
        print("| quantizer | " + " | ".join(f"seed {s}" for s in seeds) +
              " | mean | / GPTQModel default | / GPTQModel mse | seconds |")
        print("|---|" + "---:|" * (len(seeds) + 4))
        for n in names:
            g = got[n]
            cells = " | ".join(f"{g[s]['gap']:.4f}" if s in g else "" for s in seeds)
            mean = sum(r["gap"] for r in g.values()) / len(g)
            timed = [r["seconds"] for r in g.values() if r.get("seconds") is not None]
            secs = f"{sum(timed) / len(timed):.1f}" if timed else "-"
            print(f"| {n} | {cells} | {mean:.4f} | {ratio(n, 'GPTQModel 7.7 default')} | "
                  f"{ratio(n, 'GPTQModel 7.7 mse=2.4')} | {secs} |")

if __name__ == "__main__":
    raise SystemExit(main())
