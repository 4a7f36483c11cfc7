"""The fused LoRA-dropout kernels against torch compositions that use the same Philox mask."""

import pytest
import torch

from gptqlora.kernels.lora_dropout import add_dropout_dx, dropout_da, dropout_mask, dropout_xa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(got, ref):
    return float((got.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("t,k,r", [(1, 96, 8), (7, 200, 8), (4099, 128, 20), (300, 4096, 16)])
def test_kernels_match_the_composition(t, k, r):
    g = torch.Generator(device=DEVICE).manual_seed(t + k)
    p, seed = 0.1, t * 7 + k
    x = torch.randn(t, k, device=DEVICE, generator=g)
    a = torch.randn(r, k, device=DEVICE, generator=g)
    dxa = torch.randn(t, r, device=DEVICE, generator=g)
    dx = torch.randn(t, k, device=DEVICE, generator=g)
    keep = dropout_mask(t, k, p, seed, DEVICE)
    xd = x * keep / (1 - p)
    assert rel_err(dropout_xa(x, a, p, seed), xd @ a.t()) < 1e-5
    assert rel_err(dropout_da(dxa, x, p, seed), dxa.t() @ xd) < 1e-5
    want = dx + (dxa @ a) * keep / (1 - p)
    assert rel_err(add_dropout_dx(dx.clone(), dxa, a, p, seed), want) < 1e-5


@pytest.mark.skipif(DEVICE == "cpu", reason="Triton's interpreter computes tl.dot on bf16 inputs wrongly "
                    "(raw bits); bench/gpu_check.py checks bf16 on the GPU")
def test_bf16_inputs():
    x = torch.randn(64, 256, device=DEVICE).bfloat16()
    a = torch.randn(8, 256, device=DEVICE).bfloat16()
    keep = dropout_mask(64, 256, 0.2, 5, DEVICE)
    got = dropout_xa(x, a, 0.2, 5)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, (x.double() * keep / 0.8) @ a.double().t()) < 1e-2


def test_mask_rate_and_seed():
    m = dropout_mask(256, 512, 0.25, 11, DEVICE)
    assert abs(m.float().mean().item() - 0.75) < 0.01
    assert torch.equal(m, dropout_mask(256, 512, 0.25, 11, DEVICE))
    assert not torch.equal(m, dropout_mask(256, 512, 0.25, 12, DEVICE))
