"""Build run folders quickly for tests (no training): quantized tiny base + a random adapter, through `Run`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptqlora.adapters import GPTQLoraConfig, get_peft_model
from gptqlora.checkpoint.checkpoint import load_quantized
from gptqlora.checkpoint.config import QuantConfig
from gptqlora.data.templates import PromptTemplate
from gptqlora.quant.driver import quantize_model
from gptqlora.run import Run
from tiny import calibration_samples, char_tokenizer


def make_run(fp_dir: Path, root: Path, bits: int = 4, group_size: int = 32, desc_act: bool = False,
             data: list[str] | None = None, seed: int = 0, sym: bool = True, **lora) -> Path:
    run = Run.create(root)
    quantize_model(fp_dir, run.own_base_dir, QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym),
                   calibration_samples(), device="cpu", progress=False)
    pm = get_peft_model(load_quantized(run.own_base_dir, device="cpu", dtype=torch.float32),
                        GPTQLoraConfig(lora_dropout=0.0, **lora))
    torch.manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.05)
    if data is None:  # a few records, so merge --to gptq can calibrate on "the run's training data"
        from gptqlora.data.synthetic import string_records

        f = root.parent / f"{root.name}-train.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in string_records(16, seed=0)))
        data = [str(f)]
    run.record(run.own_base_dir, data, ["alpaca"], PromptTemplate.load("alpaca"))
    run.save_adapter(pm)
    run.save_tokenizer(char_tokenizer())
    return root
