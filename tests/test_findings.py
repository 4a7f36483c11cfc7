"""bench/findings.py: every row of the table runs (none left pending), the man-page fine-tuning windows never
reach into the validation split the LoRA protocol was chosen on, and the table's gap-closed columns."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import findings  # noqa: E402
from quality_models import VAL_FRAC, ModelSpec, train_text_split  # noqa: E402


class _Numbers:
    """A tokenizer of texts like '0 1 2 ...': token id = the number."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": torch.tensor([[int(w) for w in text.split()]])}


def test_every_row_is_implemented():
    kinds = {"fp", "quant", "lora", "lora_fp", "lora_then_quant"}
    assert all(row["kind"] in kinds for _, row in findings.ROWS)
    names = dict(findings.ROWS)
    assert names["GPTQ 2 bit --keep ffn"]["keep"] == ["ffn"] and names["GPTQ 2 bit --keep crucial"]["keep"] == ["crucial"]
    spqr = [row for name, row in findings.ROWS if row.get("method") == "spqr"]
    assert spqr and spqr[0]["bits"] == 3 and spqr[0]["group_size"] == 16 and spqr[0]["outlier_fraction"] == 0.01


def test_manpage_training_windows_stay_out_of_the_validation_split(tmp_path):
    n = 5000
    text = tmp_path / "train.txt"
    text.write_text(" ".join(map(str, range(n))))
    spec = ModelSpec("manpage", tmp_path, [], torch.zeros(1), None, 64, text)
    train, val = train_text_split(spec, _Numbers())
    assert train.numel() + val.numel() == n and val.numel() == n - int(n * (1 - VAL_FRAC))
    examples = findings.train_examples(spec, _Numbers(), 400, seed=0)
    seen = {t for e in examples for t in e["input_ids"]}
    assert max(seen) < int(val[0]) and len(examples[0]["input_ids"]) == 64
    assert max(seen) > 0.8 * int(val[0])  # and they do cover the fine-tuning part


def test_gap_closed_and_net_of_the_fp16_lora_reference():
    def row(name, nll):
        return {"row": name, "nll": nll, "perplexity": 2.0, "bits_per_param": 4.0, "MB": 1.0}

    results = {"m": [row("fp16", 1.0), row("GPTQ 2 bit g64", 1.2), row("LoRA on fp16, same budget", 0.95),
                     row("GPTQ-LoRA 2 bit, zero init", 1.05)]}
    args = argparse.Namespace(rank=16, alpha=0, steps=120, batch=8, lr=1e-3, ref_lr=None, warmup=10, loss="ce")
    line = next(ln for ln in findings.markdown(results, args).splitlines() if "zero init" in ln)
    cells = [c.strip() for c in line.split("|")]
    assert cells[4] == "75.0%"  # 1 - 0.05 / 0.2
    assert cells[5] == "50.0%"  # 1 - (1.05 - 0.95) / 0.2
    args.loss = "kd"  # the reference trains with the cross-entropy: no net figure for distilled rows
    line = next(ln for ln in findings.markdown(results, args).splitlines() if "zero init" in ln)
    assert [c.strip() for c in line.split("|")][5] == ""


def test_results_record_the_environment():
    """Cross-run comparisons need it: the 2-bit GPTQ rows move with the float kernels (docs/results.md)."""
    env = findings.environment()
    assert env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["transformers"] and env["python"]


def test_manpage_v2_spec_reads_the_content_split_model():
    """quantizer_compare/findings --models manpage-v2: the v2 model, its own rows' name, its test.txt."""
    from quality_models import MANPAGE_V2_DIR, SPECS

    spec = SPECS["manpage-v2"](2, seed=0)
    assert spec.name == "manpage-v2" and spec.model_dir == MANPAGE_V2_DIR
    assert len(spec.calibration) == 2 and spec.calibration[0].shape == (1, 256)
    assert spec.eval_ids.numel() > 50_000  # v2's test.txt: 86,464 tokens
