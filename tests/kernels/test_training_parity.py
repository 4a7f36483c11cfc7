"""A few GPTQ-LoRA training steps through the Triton kernels give the reference path's losses."""

import torch

from gptqlora.adapters import GPTQLoraConfig, get_peft_model
from gptqlora.kernels import dispatch
from tiny import packed_tiny_llama, train_steps


def train(monkeypatch, backend: str, bits: int, dropout: float = 0.0, steps: int = 3) -> list[float]:
    monkeypatch.setenv(dispatch.ENV, backend)
    model = packed_tiny_llama(bits, 32, seed=bits, layers=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    pm = get_peft_model(model, GPTQLoraConfig(lora_dropout=dropout, init_lora_weights="gaussian"))
    torch.manual_seed(0)
    return train_steps(pm, steps)


def test_kernel_path_losses_equal_reference_path(monkeypatch):
    for bits in (2, 3):
        kernel, ref = train(monkeypatch, "triton", bits), train(monkeypatch, "torch", bits)
        assert kernel == ref  # fp32 on CPU: the same dense W bit for bit, so the same arithmetic
        assert kernel[-1] < kernel[0]


def test_kernel_path_trains_with_dropout(monkeypatch):
    # the Triton path draws its dropout masks from Philox, the reference from torch: same law, other draws
    kernel, ref = train(monkeypatch, "triton", 4, 0.1), train(monkeypatch, "torch", 4, 0.1)
    assert kernel[-1] < kernel[0] and ref[-1] < ref[0]
    assert kernel[0] == ref[0] and kernel[1:] != ref[1:]  # B = 0 at step 1: no mask shows yet
