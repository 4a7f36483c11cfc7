"""GPTQ-LoRA layers: exactness against a float64 reference, gradients, save/load, several adapters."""

import pytest
import torch
from transformers import LlamaConfig

from gptqlora.adapters import AdapterError, GPTQLoraConfig, GPTQLoraLinear, get_peft_model, load_adapter
from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.checkpoint.checkpoint import build_empty_model, load_quantized
from gptqlora.checkpoint.config import QuantConfig
from gptqlora.nn.skeleton import quantize_skeleton
from gptqlora.quant.driver import quantize_model
from tiny import calibration_samples

IDS = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def q2_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q2") / "q"
    quantize_model(tiny_dir, out, QuantConfig(bits=2, group_size=32, desc_act=True), calibration_samples(),
                   device="cpu", progress=False)
    return out


def base(q2_dir):
    return load_quantized(q2_dir, device="cpu", dtype=torch.float32)


def randomize_b(model, std=0.05, seed=0):
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=std)


def test_b_zero_is_exactly_the_base(q2_dir):
    m = base(q2_dir)
    with torch.no_grad():
        want = m(IDS).logits
        got = get_peft_model(m, GPTQLoraConfig()).eval()(IDS).logits
    assert torch.equal(want, got)


def test_layer_matches_float64_reference(q2_dir):
    pm = get_peft_model(base(q2_dir), GPTQLoraConfig(lora_dropout=0.0))
    randomize_b(pm)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, GPTQLoraLinear) and isinstance(layer.base_layer, QuantLinear)
    x = torch.randn(3, 7, layer.in_features)
    w = layer.base_layer.dequantize(torch.float64)  # (K, N)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    want = x.double() @ w + x.double() @ a.t() @ b.t() * layer.scaling["default"]
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default").double(), (b @ a) * layer.scaling["default"])


def test_only_lora_trains_and_grads_are_finite(q2_dir):
    pm = get_peft_model(base(q2_dir), GPTQLoraConfig())
    randomize_b(pm)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    pm.train()
    pm(IDS, labels=IDS).loss.backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert all(b.grad is None for b in pm.buffers())


def test_llama_7b_trainable_parameter_count():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    model = quantize_skeleton(build_empty_model(cfg, torch.float16), bits=4, group_size=128)
    pm = get_peft_model(model, GPTQLoraConfig(r=8))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == 19_988_480  # the paper's 20.0M


def test_save_load_round_trip_and_adapter_switching(q2_dir, tmp_path):
    pm = get_peft_model(base(q2_dir), GPTQLoraConfig())
    randomize_b(pm)
    pm.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        want = pm.eval()(IDS).logits
    pm2 = load_adapter(base(q2_dir), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(pm2(IDS).logits, want)
    # a second adapter, switched to and disabled like any PEFT LoRA
    other = get_peft_model(base(q2_dir), GPTQLoraConfig())
    randomize_b(other, seed=1)
    other.save_pretrained(tmp_path / "b")
    load_adapter(pm2, tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        pm2.set_adapter("b")
        with_b = pm2(IDS).logits
        with pm2.disable_adapter():
            plain = pm2(IDS).logits
        pm2.set_adapter("default")
        assert torch.equal(pm2(IDS).logits, want)
    assert not torch.equal(with_b, want) and torch.equal(plain, base(q2_dir)(IDS).logits)


def test_saved_files_are_standard_peft(q2_dir, tmp_path):
    import json

    from safetensors import safe_open

    pm = get_peft_model(base(q2_dir), GPTQLoraConfig())
    pm.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28
    from peft import LoraConfig

    assert LoraConfig.from_pretrained(str(tmp_path / "a")).r == 8  # plain PEFT reads it


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_and_bf16_lora(q2_dir, reentrant):
    m = base(q2_dir)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    m.enable_input_require_grads()
    pm = get_peft_model(m, GPTQLoraConfig(lora_dtype="bfloat16"))
    randomize_b(pm)
    assert all(p.dtype == torch.bfloat16 for n, p in pm.named_parameters() if "lora_" in n)
    pm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pm(IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    pm.eval()
    with torch.no_grad():
        assert torch.isfinite(pm(IDS).logits).all()


def test_qalora_mode(q2_dir):
    cfg = GPTQLoraConfig(use_qalora=True, qalora_group_size=32, lora_dropout=0.0)
    pm = get_peft_model(base(q2_dir), cfg)
    randomize_b(pm)
    for p in (p for n, p in pm.named_parameters() if "lora_A" in n):
        torch.nn.init.normal_(p, std=0.1)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape == (8, 128 // 32)  # pooled input
    x = torch.randn(2, 5, 128)
    dense = x @ layer.base_layer.dequantize(torch.float32) + x @ layer.get_delta_weight("default").t()
    torch.testing.assert_close(layer(x), dense, rtol=1e-4, atol=1e-4)
    pm.train()
    pm(IDS, labels=IDS).loss.backward()


def test_svd_init_lowers_error_at_2_bit(tiny_dir, q2_dir):
    from tiny import tiny_llama

    fp = tiny_llama()
    pm = get_peft_model(base(q2_dir), GPTQLoraConfig(init_method="svd", svd_source=str(tiny_dir), lora_dropout=0.0))
    x = torch.randn(64, 128)
    for name in ("self_attn.q_proj", "mlp.up_proj"):
        ref = fp.model.layers[0].get_submodule(name)
        layer = pm.base_model.model.model.layers[0].get_submodule(name)
        with torch.no_grad():
            want = ref(x)
            with pm.disable_adapter():
                err_q = (layer(x) - want).norm()
            err_svd = (layer(x) - want).norm()
        assert err_svd < 0.9 * err_q, name


def test_svd_alternations_refit_base_codes(tiny_dir, q2_dir):
    from gptqlora.adapters.init import svd_init_layer
    from tiny import tiny_llama

    w = tiny_llama().model.layers[0].mlp.up_proj.weight.detach()
    errs = []
    for iters in (1, 3):
        pm = get_peft_model(base(q2_dir), GPTQLoraConfig(lora_dropout=0.0))
        layer = pm.base_model.model.model.layers[0].mlp.up_proj
        svd_init_layer(layer, w, "default", iters)
        eff = layer.base_layer.dequantize(torch.float32).t() + layer.get_delta_weight("default")
        errs.append(float((eff - w).norm()))
    assert errs[1] < errs[0]


# --- bad input ---------------------------------------------------------------------------------------

def test_targets_that_match_nothing(q2_dir):
    with pytest.raises(AdapterError, match=r"match no layer.*q_proj"):
        get_peft_model(base(q2_dir), GPTQLoraConfig(target_modules=["query_key_value"]))
    with pytest.raises(AdapterError, match=r"\['qproj'\] match no layer"):
        get_peft_model(base(q2_dir), GPTQLoraConfig(target_modules=["q_proj", "qproj"]))


def test_rank_larger_than_layer(q2_dir):
    with pytest.raises(AdapterError, match="r=512 is larger than layer"):
        get_peft_model(base(q2_dir), GPTQLoraConfig(r=512))


def test_adapter_for_another_model(q2_dir, tmp_path):
    from tiny import save_tiny_llama

    other = save_tiny_llama(tmp_path / "other_fp", hidden=64, intermediate=128)
    quantize_model(other, tmp_path / "other_q", QuantConfig(bits=4, group_size=32), calibration_samples(),
                   device="cpu", progress=False)
    pm = get_peft_model(load_quantized(tmp_path / "other_q", device="cpu"), GPTQLoraConfig())
    pm.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError, match="trained for another base model"):
        load_adapter(base(q2_dir), tmp_path / "a")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(base(q2_dir), tmp_path)
