"""Backend choice: Triton on CUDA, the reference elsewhere; forced by argument or GPTQLORA_KERNEL."""

import pytest
import torch

from gptqlora.kernels import dispatch
from gptqlora.nn.quant_linear import QuantLinear


def test_auto_is_reference_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.resolve("auto", torch.device("cpu")) == "torch"
    if dispatch.triton_importable():
        assert dispatch.resolve("auto", torch.device("cuda")) == "triton"


def test_environment_forces_either(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.resolve("auto", torch.device("cuda")) == "torch"
    assert dispatch.resolve("triton", torch.device("cuda")) == "triton"  # an explicit argument wins
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert dispatch.resolve("auto", torch.device("cpu")) == "triton"  # interpreter on in the tests
    monkeypatch.setenv(dispatch.ENV, "cutlass")
    with pytest.raises(ValueError, match="GPTQLORA_KERNEL"):
        dispatch.resolve("auto", torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("triton", torch.device("cpu"))


def test_quant_linear_forced_backends_agree(monkeypatch):
    layer = QuantLinear(64, 32, 4, 32)
    layer.qweight.random_(-2**31, 2**31 - 1)
    layer.qzeros.random_(-2**31, 2**31 - 1)
    layer.scales.uniform_(0.01, 0.02)
    x = torch.randn(20, 64)  # more than MAX_M rows: dequant + matmul on both paths, bit for bit
    ys = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv(dispatch.ENV, backend)
        ys.append(layer(x))
        ys.append(layer(x[:3]))  # decoding sizes: the small-M kernel sums in another order
    assert torch.equal(ys[0], ys[2])
    torch.testing.assert_close(ys[1], ys[3], rtol=1e-5, atol=1e-5)
    assert "qweight" in layer.state_dict() and "kernel" not in str(layer.state_dict().keys())
