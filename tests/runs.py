"""Build run folders quickly for tests (no training): quantized tiny base + a random-B adapter + run.json."""

from __future__ import annotations

from pathlib import Path

import torch

from gptqlora.adapters import GPTQLoraConfig, get_peft_model
from gptqlora.data.templates import PromptTemplate
from gptqlora.quant.checkpoint import load_quantized
from gptqlora.quant.config import QuantConfig
from gptqlora.quant.driver import quantize_model
from gptqlora.run import write_run_info
from tiny import calibration_samples, char_tokenizer


def make_run(fp_dir: Path, run: Path, bits: int = 4, group_size: int = 32, desc_act: bool = False,
             data: list[str] | None = None, seed: int = 0, **lora) -> Path:
    run.mkdir(parents=True)
    quantize_model(fp_dir, run / "base", QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act),
                   calibration_samples(), device="cpu", progress=False)
    pm = get_peft_model(load_quantized(run / "base", device="cpu", dtype=torch.float32),
                        GPTQLoraConfig(lora_dropout=0.0, **lora))
    torch.manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(run / "adapter")
    char_tokenizer().save_pretrained(run)
    if data is None:  # a few records, so merge --to gptq can calibrate on "the run's training data"
        import json

        from gptqlora.data.synthetic import string_records

        (run / "train.jsonl").write_text("\n".join(json.dumps(r) for r in string_records(16, seed=0)))
        data = [str(run / "train.jsonl")]
    write_run_info(run, {"base": "base", "data": data, "template": PromptTemplate.load("alpaca").to_dict()})
    return run
