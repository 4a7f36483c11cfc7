"""quant_matmul and the fused base + LoRA function: values and gradients against float64 references,
the Triton path against the torch reference path, and the adapter layer's fused path against PEFT's."""

import pytest
import torch

from gptqlora.kernels.autograd import quant_matmul
from gptqlora.kernels.lora_dropout import dropout_mask
from gptqlora.kernels.quant_lora import quant_lora_matmul
from packed import random_packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, N, R = 128, 96, 8


def rel_err(got, ref):
    return float((got.double() - ref).norm() / ref.norm())


def args(p):
    return p["qweight"], p["zeros"], p["scales"], p["g_idx"]


@pytest.mark.parametrize("m", [1, 7, 4099])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_matmul_triton_equals_reference(m, bits):
    p = random_packed(K, N, bits, 32, bits % 2 == 1, False, m + bits, DEVICE)
    x = torch.randn(m, K, device=DEVICE, requires_grad=True)
    dy = torch.randn(m, N, device=DEVICE)
    outs = []
    for backend in ("triton", "torch"):
        x.grad = None
        y = quant_matmul(x, *args(p), bits, backend)
        y.backward(dy)
        outs.append((y.detach(), x.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    w = p["w64"].to(DEVICE)
    assert rel_err(outs[0][0], x.detach().double() @ w) < 1e-5


def reference(x, a, b, w, s, mask, p):
    """float64 composition: x @ W + s * (drop(x) @ Aᵀ) @ Bᵀ with a given dropout mask."""
    xd = x if mask is None else x * mask / (1 - p)
    return x @ w + s * (xd @ a.t()) @ b.t()


@pytest.mark.parametrize("m", [1, 7, 4099])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_lora_values_and_gradients(m, dropout, backend):
    bits = 3 if m == 7 else 4
    p = random_packed(K, N, bits, 64, True, False, m, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(m)
    x = torch.randn(2, m, K, device=DEVICE, generator=g, requires_grad=True)
    a = (torch.randn(R, K, device=DEVICE, generator=g) * 0.1).requires_grad_()
    b = (torch.randn(N, R, device=DEVICE, generator=g) * 0.1).requires_grad_()
    dy = torch.randn(2, m, N, device=DEVICE, generator=g)
    s = 2.0
    torch.manual_seed(m)
    y = quant_lora_matmul(x, a, b, *args(p), bits, s, dropout, backend)
    y.backward(dy)
    mask = None
    if dropout:  # the mask the function drew: from the same RNG state
        torch.manual_seed(m)
        if backend == "triton":  # a Philox seed from torch's CPU generator
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
            mask = dropout_mask(2 * m, K, dropout, seed, DEVICE)
        else:
            _, mask = torch.native_dropout(x.detach().reshape(-1, K), dropout, True)
        mask = mask.reshape(x.shape).double()
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    want = reference(x64, a64, b64, p["w64"].to(DEVICE), s, mask, dropout)
    want.backward(dy.double())
    for got, ref in ((y, want), (x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert rel_err(got, ref) < 1e-5  # fp32 arithmetic


def test_fused_lora_bf16_close_to_float64():
    p = random_packed(K, N, 2, 32, True, False, 5, DEVICE)
    x = torch.randn(33, K, device=DEVICE)
    a, b = torch.randn(R, K, device=DEVICE) * 0.1, torch.randn(N, R, device=DEVICE) * 0.1
    y = quant_lora_matmul(x.bfloat16(), a, b, *args(p), 2, 2.0)
    assert y.dtype == torch.bfloat16
    want = reference(x.double(), a.double(), b.double(), p["w64"].to(DEVICE), 2.0, None, 0.0)
    assert rel_err(y, want) < 1e-2


def test_frozen_adapter_gets_no_gradient():
    p = random_packed(K, N, 4, 32, False, False, 9, DEVICE)
    x = torch.randn(5, K, device=DEVICE, requires_grad=True)
    a, b = torch.randn(R, K, device=DEVICE), torch.randn(N, R, device=DEVICE)
    quant_lora_matmul(x, a, b, *args(p), 4, 1.0).sum().backward()
    assert x.grad is not None and a.grad is None and b.grad is None


def test_bad_dropout():
    p = random_packed(K, N, 4, 32, False, False, 9, DEVICE)
    with pytest.raises(ValueError, match="dropout"):
        quant_lora_matmul(torch.randn(2, K), torch.randn(R, K), torch.randn(N, R), *args(p), 4, 1.0, 1.0)
