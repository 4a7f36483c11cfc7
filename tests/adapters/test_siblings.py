"""Sibling projections (q/k/v, gate/up) computed by one fused call give what layer-by-layer calls give,
with gradient checkpointing too, and a model that does not call them as a group falls back."""

import pytest
import torch
from torch import nn

from gptqlora.adapters import GPTQLoraConfig, GPTQLoraLinear, get_peft_model
from gptqlora.adapters.siblings import link_siblings, unlink_siblings
from tiny import packed_tiny_llama as packed_tiny
from tiny import train_steps


def peft_tiny(layers=2):
    pm = get_peft_model(packed_tiny(layers=layers), GPTQLoraConfig(lora_dropout=0.0))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
    return pm


def groups(pm):
    return {id(m.siblings): m.siblings for m in pm.modules() if getattr(m, "siblings", None) is not None}


def count_calls(monkeypatch):
    import gptqlora.adapters.layer as layer

    calls = []
    real = layer.quant_lora_group
    monkeypatch.setattr(layer, "quant_lora_group", lambda x, bases, *a, **k: calls.append(len(bases)) or
                        real(x, bases, *a, **k))
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_siblings_train_like_single_layers(checkpointing, monkeypatch):
    runs = []
    for linked in (True, False):
        pm = peft_tiny()
        assert len(groups(pm)) == 4  # q/k/v and gate/up in each of 2 blocks
        if checkpointing:
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            pm.base_model.model.enable_input_require_grads()
        if not linked:
            unlink_siblings(pm)
        calls = count_calls(monkeypatch)
        runs.append(train_steps(pm, 3))
        monkeypatch.undo()
        if linked:  # every forward (and recomputation) took the grouped calls, and no group gave up
            assert sorted(set(calls)) == [1, 2, 3] and all(g.enabled for g in groups(pm).values())
        else:
            assert set(calls) == {1}
    assert runs[0][-1] < runs[0][0]
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_siblings_called_on_different_inputs_fall_back():
    pm = peft_tiny(layers=1)
    attn = pm.base_model.model.model.layers[0].self_attn
    group = attn.q_proj.siblings
    x1, x2 = torch.randn(1, 4, 128), torch.randn(1, 4, 128)
    with torch.no_grad():
        unlink_siblings(pm)
        want = [attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x1)]
        link_siblings(pm)
        group = attn.q_proj.siblings
        got = [attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x1)]
    assert not group.enabled
    for g, w in zip(got, want):  # q came from the grouped call (xa of all three at once): fp32 rounding
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_an_output_never_asked_for_is_dropped():
    pm = peft_tiny(layers=1)
    attn = pm.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 4, 128)
    with torch.no_grad():
        attn.q_proj(x)  # k and v are held for x ...
        y = attn.q_proj(torch.randn(1, 4, 128))  # ... until q is called again: a new round
        assert attn.q_proj.siblings.enabled and y.shape == (1, 4, attn.q_proj.out_features)


def test_only_quantized_lora_layers_are_linked():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    assert link_siblings(Block(), GPTQLoraLinear) == 0
