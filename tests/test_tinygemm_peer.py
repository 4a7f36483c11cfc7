"""The GPTQ -> tinygemm conversion of the decode peer (bench/tinygemm_peer.py) against float64: 2/3/4 bit, plain and act-order, every
group tinygemm takes, LoRA beside it. On the CPU this runs torch's CPU int4 kernel (same formula, another
packing); on a GPU the CUDA one."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "kernels"))
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from packed import random_packed  # noqa: E402
from tinygemm_peer import plan_tinygemm, tinygemm_matmul, why_not  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 x, W with bf16 scales and bf16 zero terms s (8 - z), one rounding of y: a few bf16 ulps
TOL = 1.5e-2


def rel_err(got, ref) -> float:
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
@pytest.mark.parametrize("group,m", [(32, 1), (64, 3), (128, 8), (256, 16)])
def test_tinygemm_matches_float64(bits, act_order, group, m):
    seed = bits * 100 + group + m + act_order
    p = random_packed(512, 64, bits, group, act_order, False, seed, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, 512, device=DEVICE, generator=g).to(torch.bfloat16)
    a = (torch.randn(8, 512, device=DEVICE, generator=g) * 0.1).to(torch.bfloat16)
    b = (torch.randn(64, 8, device=DEVICE, generator=g) * 0.1).to(torch.bfloat16)
    plan = plan_tinygemm(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, group)
    assert (plan.perm is None) == (not act_order)
    w = p["w64"].to(DEVICE)
    y = tinygemm_matmul(x, plan.packed, plan.scale_zeros, plan.perm, plan.group)
    assert y.shape == (m, 64) and y.dtype == torch.bfloat16
    assert rel_err(y, x.double() @ w) < TOL
    y = tinygemm_matmul(x, plan.packed, plan.scale_zeros, plan.perm, plan.group, a, b, 2.0)
    assert rel_err(y, x.double() @ w + 2.0 * (x.double() @ a.double().t()) @ b.double().t()) < TOL


def test_a_wrong_zero_mapping_would_be_caught():
    """The test above can fail: the same layer with its zeros off by one is far outside the tolerance."""
    p = random_packed(256, 64, 4, 64, True, False, 7, DEVICE)
    x = torch.randn(4, 256, device=DEVICE).to(torch.bfloat16)
    plan = plan_tinygemm(p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, 64)
    wrong = plan.scale_zeros.clone()
    wrong[..., 1] += wrong[..., 0]  # zero term of z - 1
    assert rel_err(tinygemm_matmul(x, plan.packed, wrong, plan.perm, 64), x.double() @ p["w64"].to(DEVICE)) > 0.1
    shuffled = tinygemm_matmul(x, plan.packed, plan.scale_zeros, None, 64)  # act-order rows read unpermuted
    assert rel_err(shuffled, x.double() @ p["w64"].to(DEVICE)) > 0.1


@pytest.mark.parametrize("args,phrase", [
    ((8, 128, 4096, 4096, False), "8-bit"),
    ((4, 16, 4096, 4096, False), "group size 16"),
    ((4, 128, 4096, 4096, True), "float zeros"),
    ((4, 128, 4000, 4096, False), "shape 4000x4096"),
    ((4, 128, 4096, 4100, False), "N by 8"),
])
def test_why_not(args, phrase):
    assert phrase in why_not(*args)
    assert why_not(4, 128, 4096, 11008, False) is None and why_not(2, 64, 11008, 4096, False) is None


def test_plan_refuses_with_the_reason():
    p = random_packed(256, 64, 8, 64, False, False, 1, DEVICE)
    with pytest.raises(ValueError, match="8-bit codes"):
        plan_tinygemm(p["qweight"], p["zeros"], p["scales"], p["g_idx"], 8, 64)
