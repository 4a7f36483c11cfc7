"""Each decode launch linked to the packed weight of the next (nn/decode_order.py): the order of a block's
launches with sibling groups, without them, and broken by a layer no GPTQ launch serves."""

import torch
from torch import nn

from gptqlora import inference
from gptqlora.adapters import GPTQLoraConfig, get_peft_model
from gptqlora.kernels import dispatch
from gptqlora.nn.decode_order import launches, link_ahead
from gptqlora.nn.quant_linear import QuantLinear
from tiny import packed_tiny_llama


def _peft(model):
    return get_peft_model(model, GPTQLoraConfig(r=8, lora_dropout=0.0)).eval()


def _names(pm) -> dict[int, str]:
    return {id(m): n.removeprefix("base_model.model.model.").removesuffix(".base_layer")
            for n, m in pm.named_modules()}


def test_block_launches_in_order_with_sibling_groups(monkeypatch):
    """q|k|v and gate|up launch once each (their group copy), so a block is 4 launches; each points at the
    next one's packed weight, across blocks too; the last (before the lm_head) at nothing."""
    monkeypatch.setenv(dispatch.ENV, "triton")
    pm = _peft(packed_tiny_llama(bits=4, group_size=32, layers=2, hidden=64, intermediate=128, seed=2))
    inference.prepare_decode(pm, 1)
    names = _names(pm)
    order = launches(pm)
    assert [None if u is None else names[id(u[0])] for u in order] == [
        f"layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                       "mlp.down_proj")] + [None]  # the lm_head
    q0, o0, gate0, down0, q1 = (u[0] for u in order[:5])
    assert order[0][1] is q0.group_qweight and order[2][1] is gate0.group_qweight  # the one-launch copies
    assert q0.decode_ahead is o0.gemv_plan()[0]
    assert o0.decode_ahead is gate0.group_qweight and gate0.decode_ahead is down0.gemv_plan()[0]
    assert down0.decode_ahead is q1.group_qweight
    assert order[-2][0].decode_ahead is None
    not_launching = [m for m in pm.modules() if type(m) is QuantLinear and m not in [u[0] for u in order if u]]
    assert len(not_launching) == 6 and all(m.decode_ahead is None for m in not_launching)  # k, v, up per block


def test_siblings_that_cannot_share_a_launch_each_link_to_the_next(monkeypatch):
    """Different act-order maps: q, k, v launch one by one, seven launches a block. On the torch path there
    are no launches to link."""
    m = packed_tiny_llama(bits=4, group_size=32, layers=1, hidden=64, intermediate=128, seed=3)
    for i, mod in enumerate(x for x in m.modules() if isinstance(x, QuantLinear)):
        mod.g_idx.copy_(mod.g_idx[torch.randperm(mod.in_features, generator=torch.Generator().manual_seed(i))])
    pm = _peft(m)
    monkeypatch.setenv(dispatch.ENV, "torch")
    inference.prepare_decode(pm, 1)
    assert link_ahead(pm) == 0 and all(u is None for u in launches(pm))
    monkeypatch.setenv(dispatch.ENV, "triton")
    inference.prepare_decode(pm, 1)
    names = _names(pm)
    order = launches(pm)
    assert [names[id(u[0])].split(".")[-1] for u in order[:-1]] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert link_ahead(pm) == 6
    for (layer, _), (_, after) in zip(order[:-2], order[1:-1]):
        assert layer.decode_ahead is after


def test_a_layer_kept_in_fp16_breaks_the_chain(monkeypatch):
    """A kept fp16 down_proj (cuBLAS reads it, plain LoRA on top): gate|up asks for nothing, and down's
    place holds no launch; the next block's q|k|v is linked from nothing before it either."""
    monkeypatch.setenv(dispatch.ENV, "triton")
    m = packed_tiny_llama(bits=4, group_size=32, layers=2, hidden=64, intermediate=128, seed=4)
    m.model.layers[0].mlp.down_proj = nn.Linear(128, 64, bias=False)
    pm = _peft(m)
    inference.prepare_decode(pm, 1)
    names = _names(pm)
    order = launches(pm)
    assert [None if u is None else names[id(u[0])] for u in order[:5]] == [
        "layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj", None,
        "layers.1.self_attn.q_proj"]
    assert order[1][0].decode_ahead is order[2][1] and order[2][0].decode_ahead is None
