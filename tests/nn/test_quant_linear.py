"""QuantLinear against a float64 reference; gradient to the input only."""

import pytest
import torch

from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.quant.quantizer import rtn


def make_layer(bits=4, k=128, n=64, group_size=32, bias=True, act_order=False):
    torch.manual_seed(bits)
    res = rtn(torch.randn(n, k), bits, group_size, sym=False)
    g_idx = res.g_idx
    if act_order:  # a permuted group map, as act-order checkpoints have
        g_idx = g_idx[torch.randperm(k)]
    b = torch.randn(n).half().float() if bias else None  # biases are stored in fp16
    layer = QuantLinear.from_codes(res.codes, res.scales, res.zeros, g_idx, group_size, bits, bias=b)
    g = g_idx.long()
    w64 = (res.codes.double() - res.zeros.double()[g]) * res.scales.double()[g]  # (K, N)
    return layer, w64, b


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_forward_matches_float64_reference(bits, act_order):
    layer, w64, b = make_layer(bits, act_order=act_order)
    x = torch.randn(3, 5, 128)
    want = x.double() @ w64 + b.double()
    got = layer(x)
    assert got.shape == (3, 5, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_gradient_to_input_only():
    layer, w64, _ = make_layer(4)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad.double(), w64.sum(1).expand(4, -1), rtol=1e-5, atol=1e-4)
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(not b.requires_grad for b in layer.buffers())


def test_autocast_bf16_on_cpu():
    layer, w64, b = make_layer(4)
    x = torch.randn(2, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), x.double() @ w64 + b.double(), rtol=3e-2, atol=3e-1)


def test_dequantize_is_correctly_rounded_fp16():
    layer, w64, _ = make_layer(3)
    assert torch.equal(layer.dequantize(torch.float16), w64.to(torch.float16))


def test_decode_plan_buffers_are_never_saved(monkeypatch):
    """Decoding an act-order layer keeps a repacked copy of qweight as a non-persistent buffer."""
    from gptqlora.kernels import dispatch

    monkeypatch.setenv(dispatch.ENV, "triton")
    layer = QuantLinear(64, 32, 4, 32)
    layer.qweight.random_(-2**31, 2**31 - 1)
    layer.scales.uniform_(0.01, 0.02)
    layer.g_idx.copy_(layer.g_idx[torch.randperm(64)])
    keys = set(layer.state_dict())
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = layer(x)
    assert layer.gemv_qweight is not None and layer.gemv_qweight.shape == layer.qweight.shape
    assert set(layer.state_dict()) == keys
    monkeypatch.setenv(dispatch.ENV, "torch")
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
