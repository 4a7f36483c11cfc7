"""SpQRLinear, the second registry entry: forward and input gradient against the dense weight, the Triton
dense path (interpreter on CPU) against the torch one, the stored layout's checks; and end to end on the tiny
model: `quantize --method spqr`, load, GPTQ-LoRA on top, a run folder, `merge --to fp16`."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from gptqlora.adapters import GPTQLoraConfig, GPTQLoraLinear, get_peft_model
from gptqlora.checkpoint import CheckpointError, load_quantized, read_quant_config, save_quantized
from gptqlora.cli import main
from gptqlora.commands.merge import merge_to_fp16
from gptqlora.data.templates import PromptTemplate
from gptqlora.formats.base import FormatError
from gptqlora.formats.spqr import SpQRFormat, csr_from_mask, decode_scales, decode_stats, quantize_stats
from gptqlora.nn.registry import FORMATS
from gptqlora.nn.spqr_linear import SpQRLinear
from gptqlora.quant.spqr import SpQR
from gptqlora.run import Run, load_run
from tiny import char_tokenizer, train_steps


def spqr_layer(n=64, k=128, seed=0, desc_act=True, threshold=0.2, kernel="torch"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 15
    s = SpQR(w)
    s.add_batch(torch.randn(256, k, generator=g))
    res = s.quantize(bits=3, group_size=16, desc_act=desc_act, outlier_threshold=threshold)
    layer = SpQRLinear.from_codes(**res.layer_kwargs(), group_size=16, bits=3, bias=torch.randn(n, generator=g))
    layer.kernel = kernel
    return layer, res


def test_registered_as_the_second_format():
    assert FORMATS.lookup("spqr").layer is SpQRLinear and SpQRLinear in FORMATS.layer_classes()
    assert not FORMATS.lookup("spqr").format.universal


def test_forward_and_input_gradient_match_the_dense_weight():
    layer, res = spqr_layer()
    assert layer.nnz > 0
    w = res.dequantize()  # (N, K) fp32
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.t() + layer.bias.float(), rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(x.grad, gy @ w, rtol=1e-5, atol=1e-5)
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("desc_act", [False, True])
def test_triton_dense_path_matches_torch(desc_act):
    layer, _ = spqr_layer(desc_act=desc_act, kernel="triton")
    ref, _ = spqr_layer(desc_act=desc_act, kernel="torch")
    torch.testing.assert_close(layer.dequantize(torch.float32), ref.dequantize(torch.float32), rtol=0, atol=0)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    # 3 rows take the decode kernel, which sums K in another order than the torch path: fp32 noise of a
    # 128-term sum (2.6e-6 seen with an unseeded x), not a wrong weight (the dequantization above is exact)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_stats_and_csr_helpers():
    v = torch.rand(3, 32) * 0.1 + 0.01
    codes, step, base = quantize_stats(v, 3, 16)
    assert codes.shape == (3, 32) and step.shape == base.shape == (3, 2) and int(codes.max()) <= 7
    back = decode_stats(codes, step, base)
    assert float((back - v).abs().max()) <= float(step.float().max()) / 2 + 1e-3
    flat = torch.full((2, 16), 4.0)  # symmetric zeros: one value per group, decoded exactly
    assert torch.equal(decode_stats(*quantize_stats(flat, 3, 16)), flat)
    assert decode_scales(codes, step, base).dtype == torch.float16
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 4] = mask[2, 1] = mask[2, 3] = True
    vals, cols, rows = csr_from_mask(mask, torch.arange(15.0).reshape(3, 5))
    assert vals.tolist() == [4.0, 11.0, 13.0] and cols.tolist() == [4, 1, 3] and rows.tolist() == [0, 1, 1, 3]
    assert cols.dtype == torch.int16 and rows.dtype == torch.int32 and vals.dtype == torch.float16


def test_bad_stored_layers_are_refused():
    layer, _ = spqr_layer()
    fmt = SpQRFormat()
    spec = fmt.spec(128, 64, 3, 16)
    good = fmt.write(layer.packed_state(), layer.spec)
    assert set(fmt.read(good, spec)) >= set(good)
    broken = dict(good, outlier_rows=good["outlier_rows"].clone())
    broken["outlier_rows"][-1] += 1
    with pytest.raises(FormatError, match="outlier CSR is inconsistent"):
        fmt.read(broken, spec)
    with pytest.raises(FormatError, match="'scales_code' has shape"):
        fmt.read(dict(good, scales_code=good["scales_code"][:-1]), spec)
    with pytest.raises(FormatError, match="missing SpQR tensor"):
        fmt.read({k: v for k, v in good.items() if k != "zeros_base"}, spec)
    with pytest.raises(FormatError, match="int16"):
        fmt.spec(2**15 + 32, 64, 3, 16)


# -- end to end on the tiny model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def spqr_dir(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spqr")
    calib = tmp / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"a quick brown fox {i} jumps over it"}) for i in range(40)))
    rc = main(["quantize", str(tiny_dir), str(tmp / "q"), "--method", "spqr", "--bits", "3", "--stat-bits", "3",
               "--stat-group-size", "16", "--outlier-fraction", "0.01", "--calibration", str(calib),
               "--nsamples", "3", "--seqlen", "32"])
    assert rc == 0
    return tmp / "q"


def test_quantize_spqr_writes_the_documented_layout(spqr_dir, capsys):
    cfg = json.loads((spqr_dir / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == cfg["checkpoint_format"] == "spqr"
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["stat_bits"], cfg["stat_group_size"]) == (3, 16, False, 3, 16)
    with safe_open(spqr_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        p = "model.layers.0.mlp.down_proj"
        assert {f"{p}.{n}" for n in SpQRFormat.stored} <= keys
        assert f.get_tensor(f"{p}.outlier_cols").dtype == torch.int16
        assert f.get_tensor(f"{p}.outlier_values").dtype == torch.float16
        assert f.get_tensor(f"{p}.outlier_rows").dtype == torch.int32
    summary = json.loads((spqr_dir / "quant_report.json").read_text())["summary"]
    assert abs(summary["outlier_fraction"] - 0.01) <= 0.002
    assert summary["avg_bits"] == pytest.approx(3 + 6 / 16 + 64 / 256 + 32 * summary["outlier_fraction"], abs=1e-3)


def test_spqr_checkpoint_loads_saves_and_trains_lora(spqr_dir, tmp_path):
    model = load_quantized(spqr_dir, device="cpu", dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    assert len(layers) == 14 and sum(m.nnz for m in layers) > 0
    save_quantized(model, tmp_path / "again")
    again = load_quantized(tmp_path / "again", device="cpu", dtype=torch.float32)
    assert read_quant_config(tmp_path / "again").format == "spqr"
    ids = torch.randint(4, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    torch.manual_seed(0)
    pm = get_peft_model(model, GPTQLoraConfig(r=4, lora_dropout=0.0))
    assert isinstance(pm.base_model.model.model.layers[0].mlp.down_proj, GPTQLoraLinear)
    losses = train_steps(pm, steps=5, lr=5e-3)
    assert losses[-1] < losses[0] - 0.1


def test_lora_on_spqr_merges_to_fp16(spqr_dir, tmp_path):
    pm = get_peft_model(load_quantized(spqr_dir, device="cpu", dtype=torch.float32), GPTQLoraConfig(lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    run = Run.create(tmp_path / "run")
    run.record(spqr_dir, [], [], PromptTemplate.load("alpaca"))
    run.save_adapter(pm)
    run.save_tokenizer(char_tokenizer())
    out = merge_to_fp16(run.root, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(4, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, load_run(run.root, device="cpu", dtype=torch.float32)(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_corrupt_spqr_checkpoint_is_one_clear_error(spqr_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(spqr_dir, bad)
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.self_attn.q_proj.outlier_rows"][-1] += 3
    save_file(t, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.q_proj: the outlier CSR is inconsistent"):
        load_quantized(bad, device="cpu")


def test_decode_path_without_a_dense_weight_matches_and_compiles_in_one_graph(monkeypatch):
    """At most 16 rows without gradient, the Triton path takes spqr_small_m (decoded statistics, the small-M
    kernel, CSR SpMV) as one opaque op: equal to x @ W within fp32 rounding, one graph under torch.compile."""
    from torch._dynamo.utils import counters

    from gptqlora.kernels import spqr_triton as kspqr

    layer, res = spqr_layer(kernel="triton", desc_act=True)
    w = res.dequantize()  # (N, K)
    calls = []
    real = kspqr.spqr_small_m
    monkeypatch.setattr(kspqr, "spqr_small_m", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = layer(x)
    assert calls and layer.gemv_qweight is not None  # act-order: the decode kernel's repacked copy
    torch.testing.assert_close(y, x @ w.t() + layer.bias.float(), rtol=1e-5, atol=1e-5)
    xg = torch.randn(3, 128, requires_grad=True)
    layer(xg).sum().backward()  # a gradient is wanted: the autograd path
    assert len(calls) == 1 and xg.grad is not None
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        yc = torch.compile(layer, fullgraph=True, backend="eager")(x)
    assert torch.equal(yc, y) and not counters["graph_break"]


def test_adapter_on_spqr_decodes_in_one_launch_equal_to_the_unfused_path(monkeypatch):
    """Decoding a SpQR base with an adapter: the LoRA goes into the SpQR decode launch (no separate lora_A /
    lora_B matmuls), with the same output as the layer-then-adapter path."""
    from gptqlora.kernels import spqr_triton as kspqr

    layer, _ = spqr_layer(kernel="triton")
    model = torch.nn.Sequential(layer, torch.nn.LayerNorm(64))  # a parameter: PEFT reads the device from one
    pm = get_peft_model(model, GPTQLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"],
                                              task_type=None)).eval()
    wrapped = pm.base_model.model[0]
    torch.nn.init.normal_(wrapped.lora_B["default"].weight, std=0.1)  # B = 0 would hide a dropped update
    calls = []
    real = kspqr.spqr_small_m
    monkeypatch.setattr(kspqr, "spqr_small_m", lambda *a, **k: calls.append(a[5] is not None) or real(*a, **k))
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = wrapped(x)
    assert calls == [True]  # one launch, the adapter in it
    xg = x.clone().requires_grad_()
    want = wrapped(xg)  # the autograd path: base, then lora_B(lora_A(x)) * scaling
    assert len(calls) == 1
    torch.testing.assert_close(y, want.detach(), rtol=1e-5, atol=1e-5)
    lora_only = wrapped.lora_B["default"](wrapped.lora_A["default"](x)) * wrapped.scaling["default"]
    assert float(lora_only.norm()) > 0.01 * float(want.norm())  # the update is not negligible


def test_prepare_decode_builds_the_spqr_decode_plan_before_compiling():
    """Under torch.compile a plan cannot be built; a layer without one would take the training path."""
    from gptqlora import inference

    layer, _ = spqr_layer(kernel="triton")
    assert layer._gemv is None
    inference.prepare_decode(torch.nn.Sequential(layer))
    assert layer._gemv is not None
