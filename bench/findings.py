#!/usr/bin/env python
"""The research findings in miniature: quantization and GPTQ-LoRA recovery on two small models, one table.

    PYTHONPATH=$PWD python bench/findings.py --out findings.json --markdown findings.md   # CPU: ~1 h
    PYTHONPATH=$PWD python bench/findings.py --models manpage --loss kd --lr 3e-3 --ref-lr 3e-4   # docs/results.md

Models (bench/quality_models.py): the bundled tiny LLaMA (synthetic tasks: held-out response perplexity and
task accuracy) and the man-page LLaMA (held-out text perplexity). Every row is quantized by the same
`gptqlora.quantize` path with the defaults of the day unless the row says otherwise, and every LoRA row gets
the same budget (--steps optimizer steps, same data order, same learning rate). The man-page LoRA rows train
on the first 90% of train.txt; its last 10% is the validation split the protocol (--loss kd, --lr 3e-3) was
chosen on by bench/recovery_sweep.py. "LoRA on fp16, same budget" is the continued-training reference.

ROWS is the row list: a row is a name and a dict (kind + settings); add one there. Quantization rows take
the settings of `gptqlora quantize` (`keep` as --keep, `method` spqr with `outlier_fraction`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).parent))  # after site-packages: a bench script must not shadow a package

import torch  # noqa: E402

from quality_models import SPECS, ModelSpec, train_text_split  # noqa: E402

log = logging.getLogger("findings")

Q2 = {"bits": 2, "group_size": 64, "desc_act": True}
Q4 = {"bits": 4, "group_size": 128, "desc_act": True}
# SpQR as `gptqlora quantize --method spqr --bits 3 --group-size 16 --stat-bits 3 --stat-group-size 16
# --desc-act --outlier-fraction 0.01` (asymmetric zeros, SpQR's default): about 3.95 bits per decoder weight
SPQR3 = {"bits": 3, "group_size": 16, "desc_act": True, "sym": False, "stat_bits": 3, "stat_group_size": 16,
         "outlier_fraction": 0.01}
ROWS: list[tuple[str, dict]] = [
    ("fp16", {"kind": "fp"}),
    ("RTN 4 bit g128", {"kind": "quant", "method": "rtn", "bits": 4, "group_size": 128}),
    ("RTN 3 bit g64", {"kind": "quant", "method": "rtn", "bits": 3, "group_size": 64}),
    ("RTN 2 bit g64", {"kind": "quant", "method": "rtn", "bits": 2, "group_size": 64}),
    ("GPTQ 8 bit g128", {"kind": "quant", "bits": 8, "group_size": 128, "desc_act": True}),
    ("GPTQ 4 bit g128", {"kind": "quant", **Q4}),
    ("GPTQ 3 bit g64", {"kind": "quant", "bits": 3, "group_size": 64, "desc_act": True}),
    ("GPTQ 2 bit g64", {"kind": "quant", **Q2}),
    ("GPTQ 2 bit g64, old defaults (damp .01, no mse)", {"kind": "quant", **Q2, "damp_percent": 0.01, "mse": False}),
    ("GPTQ 2 bit --keep ffn", {"kind": "quant", **Q2, "keep": ["ffn"]}),
    ("GPTQ 2 bit --keep crucial", {"kind": "quant", **Q2, "keep": ["crucial"]}),
    ("SpQR 3 bit g16, 3-bit stats g16, 1% outliers", {"kind": "quant", "method": "spqr", **SPQR3}),
    ("LoRA on fp16, same budget", {"kind": "lora_fp"}),
    ("GPTQ-LoRA 4 bit, zero init", {"kind": "lora", **Q4, "init": "default"}),
    ("GPTQ-LoRA 4 bit, SVD init", {"kind": "lora", **Q4, "init": "svd"}),
    ("GPTQ-LoRA 4 bit, aware init", {"kind": "lora", **Q4, "init": "aware"}),
    ("GPTQ-LoRA 4 bit, QA-LoRA", {"kind": "lora", **Q4, "init": "default", "qalora": True}),
    ("GPTQ-LoRA 2 bit, zero init", {"kind": "lora", **Q2, "init": "default"}),
    ("GPTQ-LoRA 2 bit, SVD init", {"kind": "lora", **Q2, "init": "svd"}),
    ("GPTQ-LoRA 2 bit, SVD init x4 (re-rounds the codes)", {"kind": "lora", **Q2, "init": "svd", "svd_iters": 4}),
    ("GPTQ-LoRA 2 bit, aware init", {"kind": "lora", **Q2, "init": "aware"}),
    ("GPTQ-LoRA 2 bit, output init (fits the fp layer outputs)", {"kind": "lora", **Q2, "init": "output"}),
    ("GPTQ-LoRA 2 bit, QA-LoRA", {"kind": "lora", **Q2, "init": "default", "qalora": True}),
    ("LoRA in fp16, then GPTQ 4 bit", {"kind": "lora_then_quant", **Q4}),
    ("LoRA in fp16, then GPTQ 2 bit", {"kind": "lora_then_quant", **Q2}),
]
QUANT_KEYS = ("bits", "group_size", "desc_act", "sym", "damp_percent", "mse", "act_group_aware", "stat_bits",
              "stat_group_size")


# -- training ------------------------------------------------------------------------------------------------
def train_examples(spec: ModelSpec, tokenizer, n: int, seed: int) -> list[dict]:
    """`n` training examples (input_ids, labels): random 256-token windows of the first 90% of the man-page
    training text (its end is the validation split the protocol was chosen on: quality_models.train_text_split),
    or the bundled training records (prompt masked) for the tiny model; fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    if spec.train_text is not None:
        ids, _ = train_text_split(spec, tokenizer)
        starts = torch.randint(0, ids.numel() - spec.seqlen, (n,), generator=g).tolist()
        return [{"input_ids": ids[s:s + spec.seqlen].tolist(), "labels": ids[s:s + spec.seqlen].tolist()}
                for s in starts]
    from gptqlora.data.assets import default_data_files
    from gptqlora.data.dataset import build_datasets
    from gptqlora.data.templates import PromptTemplate

    rows, _ = build_datasets(default_data_files(), tokenizer, PromptTemplate.load("alpaca"), cutoff_len=spec.seqlen,
                             seed=seed)
    pick = torch.randint(0, len(rows), (n,), generator=g).tolist()
    return [{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for i in pick]


def batches(examples: list[dict], batch: int, pad: int):
    for s in range(0, len(examples), batch):
        chunk = examples[s:s + batch]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            k = len(e["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        yield ids, labels, mask


def train_lora(model, examples: list[dict], batch: int, lr: float, pad: int, warmup: int = 10,
               teacher=None) -> dict:
    """AdamW on the trainable (LoRA) parameters, linear warm-up then cosine; one pass over `examples`.

    With `teacher` (the fp model) the loss is the KL divergence to its next-token distribution (distillation)
    instead of the next-token cross-entropy. Returns the per-step cross-entropy ("losses") and that of the
    untrained model on the same batches ("untrained"): the batches differ in difficulty, so a training curve
    is read against the second, not against its own first step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = math.ceil(len(examples) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * s / steps)))
    model.eval()
    with torch.no_grad():
        untrained = [model(input_ids=i, attention_mask=m, labels=lb).loss.item()
                     for i, lb, m in batches(examples, batch, pad)]
    model.train()
    losses = []
    for ids, labels, mask in batches(examples, batch, pad):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                t = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
            keep = (labels != -100).float()  # the positions the cross-entropy scores (shifted below)
            kl = torch.nn.functional.kl_div(torch.log_softmax(out.logits.float(), -1), t, log_target=True,
                                            reduction="none").sum(-1)
            loss = (kl[:, :-1] * keep[:, 1:]).sum() / keep[:, 1:].sum()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return {"losses": losses, "untrained": untrained}


# -- rows ----------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, spec: ModelSpec, work: Path, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        self.spec, self.work, self.args = spec, work, args
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.pad = self.tokenizer.pad_token_id or 0
        self.examples = train_examples(spec, self.tokenizer, args.steps * args.batch, args.seed)
        self.quantized: dict[tuple, Path] = {}
        self.summaries: dict[Path, dict] = {}  # quant_report summary (avg bits per decoder weight, kept, outliers)
        self.n_params = None

    def quantize(self, row: dict, model_dir: Path | None = None, tag: str = "") -> tuple[Path, float]:
        from gptqlora.checkpoint.config import QuantConfig
        from gptqlora.quant.api import QuantizeOptions
        from gptqlora.quant.driver import quantize_model
        from gptqlora.quant.precision import build_rules

        method, keep = row.get("method", "gptq"), tuple(row.get("keep", ()))
        key = (tag, method, keep, row.get("outlier_fraction"), *(row.get(k) for k in QUANT_KEYS))
        if key in self.quantized:
            return self.quantized[key], 0.0
        out = self.work / f"q{len(self.quantized)}"
        src = model_dir or self.spec.model_dir
        qcfg = QuantConfig(**{k: row[k] for k in QUANT_KEYS if k in row},
                           **({"format": "spqr"} if method == "spqr" else {}),
                           **({"gptaq": self.args.gptaq} if self.args.gptaq is not None else {}))
        t = time.time()
        if keep:  # what `gptqlora quantize --keep ...` does (gptqlora.quant.api.quantize), on our calibration
            errors = None
            if "crucial" in keep:
                from gptqlora.quant.analysis import measure_errors
                errors = measure_errors(src, self.spec.calibration, qcfg, device="cpu", progress=False)
            qcfg = dataclasses.replace(qcfg, dynamic=build_rules(keep, errors=errors))
        opts = QuantizeOptions(method=method, outlier_fraction=row.get("outlier_fraction"))
        report = quantize_model(src, out, qcfg, self.spec.calibration, device="cpu", method=method, progress=False,
                                solver_options=opts.solver_options(qcfg))
        self.quantized[key] = out
        self.summaries[out] = {**report.summary, "kept": list(report.kept)}
        return out, time.time() - t

    def measure(self, model, extra_bits: float = 0.0, weight_bytes: int | None = None) -> dict:
        r = self.spec.score(model)
        out = {"perplexity": r["perplexity"], "nll": r["nll"], "tokens": r["tokens"]}
        if weight_bytes is not None:
            out["bits_per_param"] = (8 * weight_bytes + extra_bits) / self.n_params
            out["MB"] = (weight_bytes + extra_bits / 8) / 1e6
        if self.spec.eval_examples is not None and self.args.acc_limit:
            out["accuracy"] = accuracy(model, self.tokenizer, self.args.acc_limit)
        return out

    def run_row(self, row: dict) -> dict:
        from transformers import AutoModelForCausalLM

        from gptqlora.checkpoint.checkpoint import load_quantized

        kind = row["kind"]
        if kind == "pending":
            return {"pending": row.get("note", "")}
        if kind == "fp":
            m = AutoModelForCausalLM.from_pretrained(self.spec.model_dir, dtype=torch.float32)
            self.n_params = sum(p.numel() for p in m.parameters())
            return self.measure(m, weight_bytes=2 * self.n_params)
        if kind == "quant":
            q, secs = self.quantize(row)
            return {**self.measure(load_quantized(q, device="cpu", dtype=torch.float32),
                                   weight_bytes=_bytes(q)), "quantize_seconds": round(secs, 1),
                    **{f"report_{k}": v for k, v in self.summaries.get(q, {}).items()}}
        if kind == "lora":
            return self.lora_row(row)
        if kind == "lora_then_quant":
            return self.lora_then_quant(row)
        if kind == "lora_fp":
            return dict(self.fp_lora()[0])
        raise ValueError(f"unknown row kind {kind!r}")

    def lora_config(self, init: str, qalora: bool = False, group_size: int = 64, svd_iters: int = 1):
        from gptqlora.adapters import GPTQLoraConfig
        from gptqlora.adapters.config import FP_INITS

        a = self.args
        return GPTQLoraConfig(r=a.rank, lora_alpha=a.alpha or 2 * a.rank, lora_dropout=0.0, init_method=init,
                              svd_source=str(self.spec.model_dir) if init in FP_INITS else None,
                              use_qalora=qalora, qalora_group_size=group_size, svd_iters=svd_iters)

    def teacher(self):
        """The fp model, for --loss kd (LoRA distilled from it); None with the cross-entropy."""
        from transformers import AutoModelForCausalLM

        if self.args.loss != "kd":
            return None
        if not hasattr(self, "_teacher"):
            self._teacher = AutoModelForCausalLM.from_pretrained(self.spec.model_dir, dtype=torch.float32).eval()
        return self._teacher

    def train(self, pm, teacher=True, lr: float | None = None) -> dict:
        t = time.time()
        r = train_lora(pm, self.examples, self.args.batch, lr or self.args.lr, self.pad, self.args.warmup,
                       self.teacher() if teacher else None)
        n = min(10, len(r["losses"]))
        return {"last_loss": sum(r["losses"][-n:]) / n, "last_loss_untrained": sum(r["untrained"][-n:]) / n,
                "train_seconds": round(time.time() - t, 1)}

    def lora_row(self, row: dict) -> dict:
        from gptqlora.adapters import get_peft_model
        from gptqlora.checkpoint.checkpoint import load_quantized

        q, _ = self.quantize(row)
        t = time.time()
        pm = get_peft_model(load_quantized(q, device="cpu", dtype=torch.float32),
                            self.lora_config(row["init"], row.get("qalora", False), row["group_size"],
                                             row.get("svd_iters", 1)),
                            calibration=self.spec.calibration)
        init_secs = time.time() - t
        start = self.spec.score(pm)["nll"]
        trained = self.train(pm)
        lora_bits = 16 * sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
        return {**self.measure(pm, extra_bits=lora_bits, weight_bytes=_bytes(q)), "nll_at_init": start,
                **trained, "init_seconds": round(init_secs, 1)}

    def fp_lora(self) -> tuple[dict, Path]:
        """LoRA (zero init) trained on the fp model with the same budget: its scores (the continued-training
        reference) and the merged fp16 model (what "LoRA in fp16, then GPTQ" quantizes). Always with the
        cross-entropy (distilling the fp model into itself is a no-op: its gradient is zero), at --ref-lr."""
        from gptqlora.adapters import get_peft_model
        from transformers import AutoModelForCausalLM

        merged = self.work / "fp-lora-merged"
        if not hasattr(self, "_fp_lora"):
            m = AutoModelForCausalLM.from_pretrained(self.spec.model_dir, dtype=torch.float32)
            pm = get_peft_model(m, self.lora_config("default"))
            start = self.spec.score(pm)["nll"]
            trained = self.train(pm, teacher=False, lr=self.args.ref_lr)
            lora_bits = 16 * sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
            res = {**self.measure(pm, extra_bits=lora_bits, weight_bytes=2 * self.n_params), "nll_at_init": start,
                   **trained, "init_seconds": 0.0}
            pm.merge_and_unload().to(torch.float16).save_pretrained(merged)
            self.tokenizer.save_pretrained(merged)
            self._fp_lora = res
        return self._fp_lora, merged

    def lora_then_quant(self, row: dict) -> dict:
        from gptqlora.checkpoint.checkpoint import load_quantized

        _, merged = self.fp_lora()
        q, _ = self.quantize(row, merged, tag="merged")
        return self.measure(load_quantized(q, device="cpu", dtype=torch.float32), weight_bytes=_bytes(q))


DTYPE_BYTES = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _bytes(qdir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in qdir.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                total += math.prod(sl.get_shape()) * DTYPE_BYTES.get(sl.get_dtype(), 4)
    return total


def accuracy(model, tokenizer, limit: int) -> float:
    from gptqlora.data.assets import eval_data_files
    from gptqlora.data.dataset import template_for_kind
    from gptqlora.data.records import detect_kind, read_records
    from gptqlora.data.templates import PromptTemplate
    from gptqlora.eval.accuracy import task_accuracy

    records = [r for f in eval_data_files() for r in read_records(f).records[:limit]]
    tpl = PromptTemplate.load("alpaca")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return task_accuracy(model, tokenizer, records, lambda r: template_for_kind(detect_kind(r), tpl),
                         max_new_tokens=48, batch_size=50)["accuracy"]


def environment() -> dict:
    """What the numbers depend on besides the code and the flags: library versions and the CPU kernels in use.
    GPTQ at 2-3 bit is chaotic in the last float bits (a rounding that flips in one layer changes every later
    layer's calibration inputs): the same commit scores the man-page 2-bit row 56.07-56.36 under different
    SIMD kernel sets, so rows reproduce to the digit only within one environment; compare runs' `env`."""
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "python": platform.python_version()}


# -- report --------------------------------------------------------------------------------------------------
def markdown(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    """One table per model. "gap closed": 1 - gap(row) / gap(same-bit GPTQ row), both over fp16; "net of
    fp16 LoRA": 1 - (nll(row) - nll(LoRA on fp16)) / gap(same-bit GPTQ row), what is left once the
    continued training that LoRA gives the fp16 model itself is discounted."""
    lines = []
    for mname, rows in results.items():
        by = {r["row"]: r for r in rows}
        fp, q2, q4, ref = (by.get(k) for k in ("fp16", "GPTQ 2 bit g64", "GPTQ 4 bit g128", "LoRA on fp16, same budget"))
        acc = any("accuracy" in r for r in rows)
        lines += [f"\n### {mname}\n",
                  "| row | perplexity | log-ppl gap | gap closed | net of fp16 LoRA | " + ("accuracy | " if acc else "") +
                  "bits/param | MB | notes |",
                  "|---|---:|---:|---:|---:|" + ("---:|" if acc else "") + "---:|---:|---|"]
        for r in rows:
            if "pending" in r:
                lines.append(f"| {r['row']} | pending | | | | " + ("| " if acc else "") + f"| | {r['pending']} |")
                continue
            gap = r["nll"] - fp["nll"] if fp else float("nan")
            base = q2 if " 2 bit" in r["row"] and "LoRA" in r["row"] else q4 if " 4 bit" in r["row"] and \
                "LoRA" in r["row"] else None
            ok = base and fp and base["nll"] > fp["nll"]
            closed = f"{1 - gap / (base['nll'] - fp['nll']):.1%}" if ok else ""
            net = f"{1 - (r['nll'] - ref['nll']) / (base['nll'] - fp['nll']):.1%}" if ok and ref and \
                (args.loss == "ce" or "GPTQ-LoRA" not in r["row"]) else ""
            notes = []
            if "report_avg_bits" in r:
                notes.append(f"decoder linears {r['report_avg_bits']:.2f} bits/weight" +
                             (f", {len(r['report_kept'])} kept in fp16" if r.get("report_kept") else "") +
                             (f", {100 * r['report_outlier_fraction']:.2f}% outliers"
                              if "report_outlier_fraction" in r else ""))
            if "quantize_seconds" in r and r["quantize_seconds"]:
                notes.append(f"quantized in {r['quantize_seconds']}s")
            if "nll_at_init" in r:
                notes.append(f"log-ppl gap at init {r['nll_at_init'] - fp['nll']:.3f}; train loss on the last 10 "
                             f"batches {r['last_loss']:.3f} (untrained: {r['last_loss_untrained']:.3f})" +
                             (f"; init {r['init_seconds']}s" if r.get("init_seconds") else ""))
            lines.append(f"| {r['row']} | {r['perplexity']:.3f} | {gap:.4f} | {closed} | {net} | " +
                         (f"{r['accuracy']:.1%} | " if "accuracy" in r else ("| " if acc else "")) +
                         f"{r.get('bits_per_param', float('nan')):.2f} | {r.get('MB', float('nan')):.2f} | "
                         f"{'; '.join(notes)} |")
    lines.append(f"\nLoRA rows: rank {args.rank}, alpha {args.alpha or 2 * args.rank}, {args.steps} steps of "
                 f"{args.batch} examples, lr {args.lr} (warm-up {args.warmup}, cosine), no dropout, loss "
                 f"{'KL to the fp16 model (distillation)' if args.loss == 'kd' else 'cross-entropy'}; 'gap closed' "
                 f"is against the same-bit GPTQ row, 'net of fp16 LoRA' discounts what the same LoRA does to the "
                 f"fp16 model (LoRA on fp16 and 'LoRA in fp16, then GPTQ' always train with the cross-entropy, at lr "
                 f"{args.ref_lr or args.lr}: distilling fp16 into itself is a no-op; so under kd the column is left "
                 f"empty). bits/param counts every stored tensor (codes, scales, zeros, g_idx, outliers, fp16 "
                 f"embeddings and norms; LoRA weights at 16 bit).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,manpage")
    p.add_argument("--rows", default=None,
                   help="only rows whose name contains one of these (separated by ';', or ',' when no ';')")
    p.add_argument("--steps", type=int, default=120, help="LoRA optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="examples per step (man-page: 256-token windows)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=0, help="LoRA alpha (0: 2 x rank)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps before the cosine decay")
    p.add_argument("--ref-lr", type=float, default=None,
                   help="lr of the LoRA trained on fp16 (the reference row, and LoRA in fp16 then GPTQ), always "
                        "with the cross-entropy (default: --lr)")
    p.add_argument("--loss", default="ce", choices=("ce", "kd"),
                   help="ce: next-token cross-entropy on the training text; kd: KL to the fp model's "
                        "next-token distribution on it (distillation)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.add_argument("--gptaq", type=float, default=None,
                   help="GPTAQ alpha for every quantized row (default: the quantizer's default, 1; 0 turns it off)")
    p.add_argument("--acc-limit", type=int, default=50, help="tiny model: eval records per task file (0: none)")
    p.add_argument("--seed", type=int, default=0, help="LoRA training windows and torch's seed")
    p.add_argument("--calib-seed", type=int, default=0,
                   help="which calibration windows the quantizer draws (--seed leaves them alone)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--markdown", default=None, help="markdown table")
    p.add_argument("--render", default=None, help="print the markdown table of a saved --out JSON and exit")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        sys.stdout.write(markdown(saved["results"], argparse.Namespace(**{**vars(args), **saved["args"]})))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wanted = [s.strip() for s in args.rows.split(";" if ";" in args.rows else ",")] if args.rows else None
    rows = ROWS if not wanted else [r for r in ROWS if r[0] == "fp16" or any(s in r[0] for s in wanted)]
    results: dict[str, list[dict]] = {}
    env = environment()
    t0 = time.time()
    for mname in args.models.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"findings-{mname}-"))
        try:
            bench = Bench(SPECS[mname](args.nsamples, seed=args.calib_seed), work, args)
            results[mname] = []
            for name, row in rows:
                t = time.time()
                r = {"row": name, **bench.run_row(row)}
                r["seconds"] = round(time.time() - t, 1)
                results[mname].append(r)
                print(f"[{time.time() - t0:7.0f}s] {mname}: {json.dumps(r)}", flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({"args": vars(args), "env": env, "results": results},
                                                     indent=2))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    table = markdown(results, args)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(f"total {time.time() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
