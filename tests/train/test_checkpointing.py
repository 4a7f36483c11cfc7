"""Checkpointing modes: which blocks are recomputed, the measured block cost, auto's choice, offload."""

import pytest
import torch

import gptqlora
from gptqlora.adapters import GPTQLoraConfig
from gptqlora.train import checkpointing as ck
from tiny import packed_tiny_llama

LAYERS, HIDDEN, B, S = 4, 128, 2, 48


def _peft(layers=LAYERS):
    m = packed_tiny_llama(bits=4, group_size=32, layers=layers)
    m.config.use_cache = False
    pm = gptqlora.get_peft_model(m, GPTQLoraConfig(r=4, lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.05)
    pm.train()
    return pm


def _saved_bytes_and_grads(pm):
    """Bytes of activations kept for backward by one forward (model state not counted), and LoRA grads."""
    state = {ck._storage_key(t) for t in list(pm.parameters()) + list(pm.buffers())}
    seen = {}

    def pack(t):
        if ck._storage_key(t) not in state:
            seen[ck._storage_key(t)] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(4, 128, (B, S), generator=torch.Generator().manual_seed(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values()), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_plans():
    assert ck.plan("full", 8).checkpointed == list(range(8))
    assert ck.plan("none", 8).checkpointed == []
    assert ck.plan("selective", 8, fraction=0.25).checkpointed == [0, 4]
    assert ck.plan("selective", 80, fraction=0.5).checkpointed == list(range(0, 80, 2))
    assert ck.plan("auto", 8).mode == "none"  # no budget (a CPU): as finetune always did there
    cost = ck.BlockCost(per_token=1000.0)  # 1000 bytes per token per block; a checkpointed one keeps 200
    kw = dict(cost=cost, batch=1, seq=100, hidden=100, elem_bytes=2)  # block: 100 kB, or 20 kB checkpointed
    assert ck.plan("auto", 8, budget_bytes=800e3, **kw).mode == "none"
    p = ck.plan("auto", 8, budget_bytes=500e3, **kw)  # (500 - 100 - 8 x 20) / 80 = 3 blocks kept
    assert p.mode == "selective" and len(p.checkpointed) == 5
    assert ck.plan("auto", 8, budget_bytes=200e3, **kw).mode == "full"
    with pytest.raises(ValueError, match="--gradient_checkpointing"):
        ck.plan("some", 8)


def test_resolve_mode_keeps_the_research_flag():
    assert ck.resolve_mode(True, "auto") == "full" and ck.resolve_mode(False, "selective") == "selective"
    assert ck.resolve_mode(True, "none") == "none" and ck.resolve_mode(False, "auto") == "auto"


def test_measured_block_cost_predicts_what_training_keeps():
    """measure_block (one block, two short sequences) against the whole model's forward at another shape."""
    pm = _peft()
    cost = ck.measure_block(pm, ck.decoder_blocks(pm)[0], HIDDEN, None)
    none_bytes, g_none = _saved_bytes_and_grads(pm)
    pm_full = _peft()
    ck.apply(pm_full.get_base_model(), ck.plan("full", LAYERS))
    full_bytes, g_full = _saved_bytes_and_grads(pm_full)
    kept_per_block = (none_bytes - full_bytes) / LAYERS + B * S * HIDDEN * 4  # a checkpointed one keeps its input
    assert kept_per_block == pytest.approx(cost.bytes(B, S), rel=0.1)
    for n in g_none:  # recomputing changes nothing
        torch.testing.assert_close(g_full[n], g_none[n], rtol=1e-5, atol=1e-7)


def test_selective_recomputes_only_its_blocks():
    pm = _peft()
    base = pm.get_base_model()
    ck.apply(base, ck.plan("selective", LAYERS, fraction=0.5))
    assert [b.gradient_checkpointing for b in ck.decoder_blocks(pm)] == [True, False, True, False]
    calls = []
    for i, b in enumerate(ck.decoder_blocks(pm)):
        b.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))  # HF checkpoints forward, not hooks
    _saved_bytes_and_grads(pm)
    assert sorted(calls) == [0, 0, 1, 2, 2, 3]  # blocks 0 and 2 ran again in backward


def test_offload_moves_the_block_inputs_and_gradients_are_unchanged():
    ref = _peft()
    ck.apply(ref.get_base_model(), ck.plan("full", LAYERS))
    _, g_ref = _saved_bytes_and_grads(ref)
    pm = _peft()
    hooks = ck.OffloadHooks(pm, min_bytes=0, devices=("cpu",))  # the GPU path's logic, on host copies
    ck.apply(pm.get_base_model(), ck.plan("full", LAYERS), offload=True, hooks=hooks)
    _, g = _saved_bytes_and_grads(pm)
    assert hooks.offloaded_bytes == LAYERS * B * S * HIDDEN * 4  # each block's input, nothing else
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_a_gpu_keeps_every_block_of_a_tiny_model_and_offload_round_trips():
    m = packed_tiny_llama(bits=4, group_size=32, layers=LAYERS).cuda()
    pm = gptqlora.get_peft_model(m, GPTQLoraConfig(r=4, lora_dropout=0.0))
    p = ck.setup(pm, "auto", fraction=0.5, batch=B, seq=S, dtype=torch.bfloat16, optim="adamw_torch")
    assert p.mode == "none"
    pm2 = gptqlora.get_peft_model(packed_tiny_llama(bits=4, group_size=32, layers=LAYERS).cuda(),
                                  GPTQLoraConfig(r=4, lora_dropout=0.0))
    hooks = ck.apply(pm2.get_base_model(), ck.plan("full", LAYERS), offload=True,
                     hooks=ck.OffloadHooks(pm2, min_bytes=0))
    ids = torch.randint(4, 128, (B, S), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = pm2(input_ids=ids, labels=ids).loss
    loss.backward()
    assert hooks.offloaded_bytes == LAYERS * B * S * HIDDEN * 4 and torch.isfinite(loss)
