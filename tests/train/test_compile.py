"""--compile blocks (train/compile.py): a GPTQ-LoRA decoder block is one graph in training mode, and compiled
training (checkpointed, siblings fused) gives the eager path's losses and LoRA weights."""

import json

import pytest
import torch
import torch._dynamo as dynamo

import gptqlora
from gptqlora.adapters import GPTQLoraConfig
from gptqlora.cli import main
from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.train import compile as tc
from tiny import packed_tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(layers=2, dropout=0.0, act_order=False, kernel="auto"):
    model = packed_tiny_llama(bits=4, group_size=32, layers=layers)
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel
            if act_order:  # groups in a random row order, as act-order GPTQ writes them
                m.g_idx.copy_(m.g_idx[torch.randperm(m.g_idx.numel(), generator=g)])
    model.config.use_cache = False
    pm = gptqlora.get_peft_model(model, GPTQLoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                       target_modules=TARGETS))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    pm.train()
    return pm


def _steps(pm, n=3):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    out = []
    for i in range(n):  # a new sequence length each step: the compiled block must follow (dynamic shapes)
        ids = torch.randint(4, 128, (2, 16 + 8 * i), generator=torch.Generator().manual_seed(i))
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out, {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    assert not dynamo.config.disable, "torch.compile is turned off in this process (TORCHDYNAMO_DISABLE)"
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_training_block_is_one_graph(dropout):
    pm = _peft(dropout=dropout)
    layer = pm.base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.siblings is not None  # q/k/v fused: the sibling group is traced too
    x = torch.randn(2, 16, 128, requires_grad=True)
    pos = torch.arange(16)[None].expand(2, -1)
    rot = pm.base_model.model.model.rotary_emb(x, pos)
    ex = dynamo.explain(lambda h: layer(h, position_embeddings=rot, attention_mask=None, position_ids=pos))(x)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason)[:200] for b in ex.break_reasons]


def _check_parity(backend, atol=1e-5, **kw):
    eager_losses, eager_w = _steps(_ckpt(_peft(**kw)))
    pm = _ckpt(_peft(**kw))
    assert tc.compile_blocks(pm, backend=backend) == 2
    losses, w = _steps(pm)
    tol = 1e-5 if atol else 0.0  # atol 0: bit-identical
    assert losses == pytest.approx(eager_losses, rel=tol, abs=tol)
    for n in eager_w:
        torch.testing.assert_close(w[n], eager_w[n], rtol=1e-3 if atol else 0.0, atol=atol)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in pm.base_model.model.model.layers)


def _ckpt(pm):
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.enable_input_require_grads()
    return pm


def test_compiled_checkpointed_training_equals_eager():
    _check_parity("aot_eager")


def test_compiled_training_equals_eager_on_the_triton_path_with_act_order(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check_parity("aot_eager", act_order=True, kernel="triton")


def test_compiled_seeded_dropout_equals_eager(monkeypatch):
    """Dropout on the Triton path under compile: the seed is drawn in the graph and the same kernels regenerate
    the mask in backward (no mask kept), so with aot_eager (same RNG stream) the steps are bit-identical."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check_parity("aot_eager", atol=0.0, dropout=0.1, kernel="triton")


def test_inductor_compiled_training_equals_eager():
    # inductor reorders fp32 sums; three Adam steps (lr 1e-2) carry those last-bit differences into the
    # weights at ~5e-5 on entries of ~0.02
    _check_parity("inductor", atol=3e-4)


def test_finetune_compile_blocks(tiny_run, tmp_path, monkeypatch):
    from gptqlora.data.synthetic import string_records

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in string_records(16, seed=2)))
    seen = []
    real = tc.compile_blocks
    monkeypatch.setattr(tc, "compile_blocks", lambda m, **k: seen.append(real(m, backend="aot_eager", **k)) or seen[-1])
    undone, real_undo = [], tc.uncompile_blocks
    monkeypatch.setattr(tc, "uncompile_blocks", lambda m: undone.append(real_undo(m)) or undone[-1])
    args = ["finetune", "--quant_checkpoint", str(tiny_run / "base"), "--data", str(data), "--max_steps", "2",
            "--micro_batch_size", "4", "--batch_size", "4", "--cutoff_len", "256", "--compile", "blocks"]
    assert main([*args, "--output_dir", str(tmp_path / "run")]) == 0
    assert seen == [2]  # the tiny base's two blocks
    assert undone == [2]  # eager again after training (the accuracy evaluation generates)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["args"]["TrainArguments"]["compile"] == "blocks" and info["result"]["compile"] == "blocks"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists() or \
        list((tmp_path / "run").rglob("adapter_model.safetensors"))


def test_auto_compiles_on_cuda_only():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert tc.resolve_compile("auto", cuda) == "blocks"
    assert tc.resolve_compile("auto", cuda, offload_activations=True) == "none"  # its hooks cannot be traced
    assert tc.resolve_compile("auto", cpu) == "none"
    assert tc.resolve_compile("blocks", cpu) == "blocks" and tc.resolve_compile("none", cuda) == "none"
    with pytest.raises(ValueError, match="compile mode"):
        tc.resolve_compile("always", cuda)


def test_compile_with_offload_is_one_clear_error(tiny_run, tmp_path, capsys):
    rc = main(["finetune", "--quant_checkpoint", str(tiny_run / "base"), "--output_dir", str(tmp_path / "run"),
               "--compile", "blocks", "--offload_activations"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--compile blocks with --offload_activations" in err[0]


def test_compiled_block_adds_the_lora_products_in_place():
    """Traced, `c.addmm_(a, b)` becomes an out-of-place addmm, which copies c first: a device copy of every
    layer's output (forward) and input gradient (backward) per call. The graphs hold the in-place custom op
    (kernels/quant_lora.py, `addmm_`) instead, and no addmm."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def grab(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    pm = _ckpt(_peft(dropout=0.1))
    tc.compile_blocks(pm, backend=aot_autograd(fw_compiler=grab, bw_compiler=grab))
    _steps(pm, n=1)
    calls = [f"{n.target} {n.args[0] if n.args else ''}" for g in graphs for n in g.graph.nodes
             if n.op == "call_function"]
    assert len(graphs) >= 2  # a forward and a backward
    assert not [c for c in calls if "aten.addmm" in c]
    assert len([c for c in calls if "gptqlora.addmm_" in c]) >= 7  # per layer in forward, more in backward
