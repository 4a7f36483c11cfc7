"""The Triton dequantization kernel against the torch reference, on fresh random layers.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py). The
interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even; bf16 results are checked against
both roundings accordingly, and exactly on a GPU.
"""

import pytest
import torch

from gptqlora.kernels.dequant import dequantize_triton, plan_for
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


def run(p, bits, kernel, group_size, **kw):
    """The grouped kernel (with the layer's plan) or the gather kernel (any g_idx)."""
    plan = plan_for(p["g_idx"], group_size) if kernel == "grouped" else None
    if kernel == "grouped":
        assert plan is not None
    return dequantize_triton(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, plan=plan, **kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("kernel", ["grouped", "gather"])
def test_matches_reference_every_layout(bits, act_order, group_size, kernel):
    seed = bits * 100 + act_order * 10 + group_size
    p = random_packed(192, 96, bits, group_size, act_order, False, seed, DEVICE)
    exact = dequantize(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, torch.float32)
    torch.testing.assert_close(exact.double().cpu(), p["w64"], rtol=1e-6, atol=1e-7)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = run(p, bits, kernel, group_size, dtype=dtype)
        assert got.dtype == dtype and got.shape == (192, 96)
        assert_rounded(got, exact)


def test_plan_follows_the_group_structure():
    p = random_packed(160, 32, 4, 64, True, False, 3, DEVICE)  # 3 groups, the last one partial (32 rows)
    plan = plan_for(p["g_idx"], 64)
    assert plan.group == 64 and torch.equal(p["g_idx"][plan.perm.long()].cpu(), torch.arange(160) // 64)
    assert plan_for(torch.arange(160, dtype=torch.int32) // 64, 64).perm is None  # sorted: no permutation
    irregular = torch.randint(0, 3, (160,), dtype=torch.int32)  # not GPTQ-shaped: the gather kernel runs
    assert plan_for(irregular, 64) is None
    exact = dequantize(p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, torch.float32)
    assert_rounded(run(p, 4, "grouped", 64, dtype=torch.float16), exact)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kernel", ["grouped", "gather"])
def test_float_zeros(bits, kernel):
    p = random_packed(64, 64, bits, 32, True, True, 7 + bits, DEVICE)
    exact = dequantize(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, torch.float32)
    assert_rounded(run(p, bits, kernel, 32, dtype=torch.float16), exact)


@pytest.mark.parametrize("bits,k,n,block_k,block_n", [
    (3, 96, 160, 32, 128),   # K and N both leave a partial block; 3-bit words straddle inside a block
    (4, 224, 40 * 8, 16, 64),
    (2, 32 * 5, 48 * 2, 32, 256),
    (8, 40, 24, 8, 32),
])
@pytest.mark.parametrize("kernel", ["grouped", "gather"])
def test_partial_blocks_and_every_element_written(bits, k, n, block_k, block_n, kernel):
    p = random_packed(k, n, bits, 32, True, False, k + n, DEVICE)
    out = torch.full((k, n), float("nan"), dtype=torch.float16, device=DEVICE)  # poison
    run(p, bits, kernel, 32, out=out, block_k=block_k, block_n=block_n)
    assert torch.isfinite(out).all()
    exact = dequantize(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, torch.float32)
    assert_rounded(out, exact)
