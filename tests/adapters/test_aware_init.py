"""Activation-aware LoRA init: the whitened SVD is the best rank-r fit under the data's norm, and on a real
quantized model it starts closer to the fp model than the zero and plain-SVD inits."""

import pytest
import torch

from gptqlora.adapters import GPTQLoraConfig, get_peft_model
from gptqlora.adapters.aware import lstsq_target, whitened_lowrank
from gptqlora.adapters.layer import GPTQLoraLinear
from gptqlora.checkpoint.checkpoint import load_quantized
from gptqlora.checkpoint.config import QuantConfig
from gptqlora.quant.driver import quantize_model
from tiny import calibration_samples


def test_whitened_lowrank_beats_plain_svd_under_the_data_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=g) * torch.logspace(0, -2, 48)  # inputs of very uneven scale (T, K)
    resid = torch.randn(32, 48, generator=g)  # (N, K)
    B, A = whitened_lowrank(resid, x.t() @ x, r=4, damp=1e-6)
    U, S, Vh = torch.linalg.svd(resid, full_matrices=False)
    plain = (U[:, :4] * S[:4]) @ Vh[:4]

    def err(e):
        return float((x @ e.t()).pow(2).sum())

    assert err(resid - B @ A) < 0.8 * err(resid - plain)
    # and it is the optimum: no small perturbation of B A does better
    for _ in range(5):
        d = 1e-2 * torch.randn(32, 48, generator=g)
        Ud, Sd, Vhd = torch.linalg.svd(B @ A + d, full_matrices=False)
        assert err(resid - B @ A) <= err(resid - (Ud[:, :4] * Sd[:4]) @ Vhd[:4]) + 1e-6


def test_aware_init_needs_calibration(tiny_dir, tmp_path):
    q = tmp_path / "q"
    quantize_model(tiny_dir, q, QuantConfig(bits=2, group_size=32), calibration_samples(4), device="cpu",
                   progress=False)
    with pytest.raises(ValueError, match="calibration"):
        get_peft_model(load_quantized(q, device="cpu", dtype=torch.float32),
                       GPTQLoraConfig(init_method="aware", svd_source=str(tiny_dir)))
    with pytest.raises(ValueError, match="svd_source"):
        GPTQLoraConfig(init_method="aware")


def _kl_to(fp, model, samples) -> float:
    """Mean per-token KL(fp || model) of the next-token distributions."""
    total = 0.0
    with torch.no_grad():
        for s in samples:
            t = torch.log_softmax(fp(input_ids=s).logits.float(), -1)
            o = torch.log_softmax(model(input_ids=s).logits.float(), -1)
            total += float(torch.nn.functional.kl_div(o, t, log_target=True, reduction="sum")) / s.shape[1]
    return total / len(samples)


def test_lstsq_target_is_the_weight_when_the_inputs_agree_and_fits_the_fp_outputs_otherwise():
    g = torch.Generator().manual_seed(0)
    xq = torch.randn(400, 24, generator=g, dtype=torch.float64)  # (T, K)
    xf = xq + 0.3 * torch.randn(400, 24, generator=g, dtype=torch.float64)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    H = xq.t() @ xq
    assert torch.allclose(lstsq_target(w, H, H), w, atol=1e-10)
    target = lstsq_target(w, H, xq.t() @ xf, damp=1e-9)
    exact = torch.linalg.lstsq(xq, xf @ w.t()).solution.t()  # argmin ||xq Mᵀ - xf wᵀ||
    assert torch.allclose(target, exact, atol=1e-6)


@pytest.fixture(scope="module")
def gptaq_2bit(tiny_dir, tmp_path_factory):
    q = tmp_path_factory.mktemp("gptaq") / "q"
    quantize_model(tiny_dir, q, QuantConfig(bits=2, group_size=32, desc_act=True, gptaq=1.0), calibration_samples(16),
                   device="cpu", progress=False)
    return q


def test_fp_block_rebuilds_the_fp_model_block(tiny_dir, gptaq_2bit):
    from transformers import AutoModelForCausalLM

    from gptqlora.adapters.aware import fp_block
    from gptqlora.checkpoint.io import SafetensorsSource

    pm = get_peft_model(load_quantized(gptaq_2bit, device="cpu", dtype=torch.float32), GPTQLoraConfig(r=4))
    fp = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    block = pm.get_base_model().model.layers[1]
    rebuilt = fp_block(block, SafetensorsSource(tiny_dir), "model.layers.1", torch.float32)
    assert not any(isinstance(m, GPTQLoraLinear) for m in rebuilt.modules())
    for name, t in fp.model.layers[1].state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], t), name


def test_output_init_starts_closer_to_the_fp_model_than_aware_on_a_gptaq_base(tiny_dir, gptaq_2bit):
    """On a GPTAQ base, aware (which restores W_fp) pulls the codes' target back and starts *worse* than B = 0
    here; the output init, fitted to the fp layer outputs, starts closest, on the calibration and on other tokens."""
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    calib, held = calibration_samples(16), calibration_samples(8, seed=1)
    kl = {}
    for init in ("default", "aware", "output"):
        cfg = GPTQLoraConfig(r=8, lora_dropout=0.0, init_method=init,
                             svd_source=None if init == "default" else str(tiny_dir))
        pm = get_peft_model(load_quantized(gptaq_2bit, device="cpu", dtype=torch.float32), cfg, calibration=calib)
        pm.eval()
        kl[init] = (_kl_to(fp, pm, calib), _kl_to(fp, pm, held))
    assert kl["output"][0] < 0.7 * kl["aware"][0] and kl["output"][0] < kl["default"][0]
    assert kl["output"][1] < 0.9 * kl["aware"][1] and kl["output"][1] < kl["default"][1]


def test_output_init_needs_calibration_and_the_fp_model(tiny_dir, gptaq_2bit):
    with pytest.raises(ValueError, match="calibration"):
        get_peft_model(load_quantized(gptaq_2bit, device="cpu", dtype=torch.float32),
                       GPTQLoraConfig(init_method="output", svd_source=str(tiny_dir)))
    with pytest.raises(ValueError, match="svd_source"):
        GPTQLoraConfig(init_method="output")


def test_balanced_factors_keep_the_product_and_split_it_evenly():
    from gptqlora.adapters.aware import balanced_factors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 48, dtype=torch.float64)
    B, A = whitened_lowrank(torch.randn(32, 48, generator=g), x.t() @ x, r=4)
    Bb, Ab = balanced_factors(B.double(), A.double())
    assert torch.allclose(Bb @ Ab, B.double() @ A.double(), atol=1e-5)
    assert torch.allclose(Bb.t() @ Bb, Ab @ Ab.t(), atol=1e-5)  # both S (diagonal): the split of the SVD init
    assert float(B.norm()) > 3 * float(A.norm())  # the whitened split: B carries the activations' scale
    Bw, Aw = whitened_lowrank(torch.randn(32, 48, generator=g), x.t() @ x, r=4, balance=True)
    assert torch.allclose(Bw.t() @ Bw, Aw @ Aw.t(), atol=1e-4)
