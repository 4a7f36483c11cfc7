"""GPTQLoraLinear's fused base + LoRA path computes what PEFT's generic composition computes."""

import pytest
import torch

from gptqlora.adapters import GPTQLoraConfig, GPTQLoraLinear, get_peft_model
from tiny import packed_tiny_llama as packed_tiny
from tiny import train_steps


def losses(model, fused: bool, monkeypatch, steps=3):
    if not fused:
        monkeypatch.setattr(GPTQLoraLinear, "_fused_adapter", lambda self, kwargs: None)
    pm = get_peft_model(model, GPTQLoraConfig(lora_dropout=0.0))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
    out = train_steps(pm, steps)
    monkeypatch.undo()
    return out


def test_fused_training_equals_peft_composition(monkeypatch):
    fused = losses(packed_tiny(), True, monkeypatch)
    generic = losses(packed_tiny(), False, monkeypatch)
    assert fused[-1] < fused[0]
    assert fused == pytest.approx(generic, rel=1e-5)


def test_fused_path_is_taken_only_when_it_applies(monkeypatch):
    pm = get_peft_model(packed_tiny(), GPTQLoraConfig(lora_dropout=0.1))
    layer = next(m for m in pm.modules() if isinstance(m, GPTQLoraLinear))
    assert layer._fused_adapter({}) == "default"
    assert layer._fused_adapter({"adapter_names": ["default"]}) is None  # mixed-batch inference: PEFT's path
    with pm.disable_adapter():
        assert layer._fused_adapter({}) is None
    pm.add_adapter("second", GPTQLoraConfig())
    pm.base_model.set_adapter(["default", "second"])
    assert layer._fused_adapter({}) is None  # two active adapters: the generic sum


def test_eval_mode_applies_no_dropout():
    pm = get_peft_model(packed_tiny(), GPTQLoraConfig(lora_dropout=0.5)).eval()
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(4, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, pm(input_ids=ids).logits)
