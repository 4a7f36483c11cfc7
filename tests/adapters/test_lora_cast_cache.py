"""The LoRA weights' cast copies that fused calls keep between calls (kernels/quant_lora.py, LoraCast) never
go stale: training with them gives exactly the losses and gradients of casting on every call, after every
optimizer step, also for an optimizer that writes through `.data` (no version counter bump: the backward
drops them), and they are made once per training step, not once per call."""

import pytest
import torch

from gptqlora.adapters import GPTQLoraConfig, get_peft_model
from gptqlora.kernels import quant_lora
from tiny import packed_tiny_llama


class DataSGD(torch.optim.Optimizer):
    """Plain SGD writing through `p.data` (as optimizers that hand raw pointers to kernels do)."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad.data, alpha=-g["lr"])


def train(monkeypatch, cache: bool, autocast: bool, optim: str, steps: int = 3, checkpointing: bool = True):
    monkeypatch.setenv(quant_lora.CAST_CACHE_ENV, "1" if cache else "0")
    model = packed_tiny_llama(4, 32, seed=3, layers=2)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    pm = get_peft_model(model, GPTQLoraConfig(lora_dropout=0.0, init_lora_weights="gaussian")).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2) if optim == "adamw" else DataSGD(params, lr=0.5)
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    made = []
    real = quant_lora.LoraCast.__init__
    monkeypatch.setattr(quant_lora.LoraCast, "__init__", lambda self, *a: made.append(1) or real(self, *a))
    losses, grads, per_step = [], [], []
    for _ in range(steps):
        n0 = len(made)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        per_step.append(len(made) - n0)
    monkeypatch.undo()
    return losses, grads, per_step


@pytest.mark.parametrize("autocast,optim", [(True, "adamw"), (False, "adamw"), (True, "data-sgd")])
def test_cached_casts_train_exactly_like_casting_every_call(monkeypatch, autocast, optim):
    cached, cached_grads, made_cached = train(monkeypatch, True, autocast, optim)
    fresh, fresh_grads, made_fresh = train(monkeypatch, False, autocast, optim)
    assert cached[-1] < cached[0]
    assert cached == fresh  # bit for bit: a stale copy after a step would change the next loss
    for g1, g2 in zip(cached_grads, fresh_grads):
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    # per step: 4 fused calls per block (q/k/v, o, gate/up, down) x 2 blocks; with the cache each makes its
    # copies once (the recomputation under checkpointing reuses them), without it forward and recompute both
    assert made_cached == [8] * 3
    assert made_fresh == [16] * 3


def test_cache_sees_in_place_edits_and_a_backward_drops_it(monkeypatch):
    monkeypatch.setenv(quant_lora.CAST_CACHE_ENV, "1")
    pm = get_peft_model(packed_tiny_llama(4, 32, seed=3, layers=1), GPTQLoraConfig(lora_dropout=0.0))
    ids = torch.randint(4, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    made = []
    real = quant_lora.LoraCast.__init__
    monkeypatch.setattr(quant_lora.LoraCast, "__init__", lambda self, *a: made.append(1) or real(self, *a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = pm(input_ids=ids).logits
        again = pm(input_ids=ids).logits  # eval-like second call: no new copies
        assert len(made) == 4 and torch.equal(first, again)
        b = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        with torch.no_grad():
            b.add_(0.5)  # an in-place edit outside any optimizer (bumps the version counter)
        after = pm(input_ids=ids)
        assert len(made) == 5  # only the q/k/v group made its copies again
        assert not torch.equal(first, after.logits)
        after.logits.float().sum().backward()  # an optimizer step may follow: every copy is dropped
        pm(input_ids=ids)
    assert len(made) == 9


def test_copies_made_in_inference_mode_are_not_reused_for_training(monkeypatch):
    monkeypatch.setenv(quant_lora.CAST_CACHE_ENV, "1")
    pm = get_peft_model(packed_tiny_llama(4, 32, seed=3, layers=1), GPTQLoraConfig(lora_dropout=0.0))
    ids = torch.randint(4, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # as generate / chat run
        pm(input_ids=ids)
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()  # would raise: inference tensors saved for backward
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad is not None
