"""The Triton dequantization kernel against the torch reference, on fresh random layers.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py). The
interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even; bf16 results are checked against
both roundings accordingly, and exactly on a GPU.
"""

import pytest
import torch

from gptqlora.kernels.dequant import dequantize_triton
from gptqlora.kernels.reference import dequantize
from packed import random_packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_rounded(got: torch.Tensor, exact32: torch.Tensor) -> None:
    """got == exact32 rounded to got's dtype (nearest even; or truncated, for bf16 in the interpreter)."""
    want = exact32.to(got.dtype)
    if got.dtype == torch.bfloat16 and got.device.type == "cpu":
        truncated = (exact32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
        assert bool(((got == want) | (got == truncated)).all())
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_matches_reference_every_layout(bits, act_order, group_size):
    seed = bits * 100 + act_order * 10 + group_size
    p = random_packed(192, 96, bits, group_size, act_order, False, seed, DEVICE)
    exact = dequantize(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, torch.float32)
    torch.testing.assert_close(exact.double().cpu(), p["w64"], rtol=1e-6, atol=1e-7)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = dequantize_triton(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, dtype)
        assert got.dtype == dtype and got.shape == (192, 96)
        assert_rounded(got, exact)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float_zeros(bits):
    p = random_packed(64, 64, bits, 32, True, True, 7 + bits, DEVICE)
    exact = dequantize(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, torch.float32)
    assert_rounded(dequantize_triton(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits,
                                     torch.float16), exact)


@pytest.mark.parametrize("bits,k,n,block_k,block_n", [
    (3, 96, 160, 64, 128),   # K and N both leave a partial block; 3-bit words straddle inside a block
    (4, 224, 40 * 8, 128, 64),
    (2, 32 * 5, 48 * 2, 32, 256),
    (8, 40, 24, 32, 32),
])
def test_partial_blocks_and_every_element_written(bits, k, n, block_k, block_n):
    p = random_packed(k, n, bits, 32, True, False, k + n, DEVICE)
    out = torch.full((k, n), float("nan"), dtype=torch.float16, device=DEVICE)  # poison
    dequantize_triton(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, out=out, block_k=block_k,
                      block_n=block_n)
    assert torch.isfinite(out).all()
    exact = dequantize(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, torch.float32)
    assert_rounded(out, exact)
