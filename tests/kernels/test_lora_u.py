"""kernels/lora_u.py (the adapter's u = x Aᵀ for up to three siblings in one launch) against torch, in Triton's
interpreter on the CPU: 1-3 projections, M = 1..16, fp32 and bf16 A, K not a multiple of the tile or of a
program's 512 rows; the chunks' counters end as they began."""

import pytest
import torch

from gptqlora.kernels.lora_u import lora_u, lora_u_reference


@pytest.mark.parametrize("projections,m,k,r,dtype", [(1, 1, 512, 8, torch.float32), (3, 5, 700, 8, torch.float32),
                                                      (2, 16, 256, 16, torch.bfloat16), (3, 8, 1100, 4, torch.bfloat16),
                                                      (3, 1, 1536, 8, torch.float32), (2, 2, 1200, 6, torch.float32),
                                                      (2, 8, 8804, 8, torch.float32)])  # 18 chunks: two loads of 16
@pytest.mark.parametrize("mode", [1, 2])
def test_u_equals_x_at_a_transposed(projections, m, k, r, dtype, mode):
    g = torch.Generator().manual_seed(m * k + r)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    a = [torch.randn(r, k, generator=g).to(dtype) for _ in range(projections)]
    locks = torch.zeros(5, dtype=torch.int32)
    u = lora_u(x, a, locks, mode=mode)
    assert not locks.any()  # ready for the next call and the decode kernel that shares them
    assert torch.equal(lora_u(x, a, locks, mode=mode), u)  # the chunks summed in a fixed order: the same bits every call
    assert u.shape == (projections, m, r) and u.dtype == torch.float32
    want = lora_u_reference(x, a)
    # fp32 sums over K of O(1) terms: rounding grows with sqrt(K) (K = 8804: ~3e-4 on entries of ~100); on the
    # tensor cores (mode 2) an fp32 A is two 16-bit halves, exact to ~2^-16 of each value
    tol = 1e-4 if mode != 2 or dtype != torch.float32 else 2e-5 * k ** 0.5
    assert torch.allclose(u, want, rtol=tol, atol=tol * max(1.0, k / 2048)), (u - want).abs().max()
    # each projection's u is its own: not the first's repeated
    assert projections == 1 or not torch.allclose(u[0], u[-1])


def test_bad_shapes_get_one_clear_error():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="1-3 A's"):
        lora_u(x, [torch.randn(4, 64)] * 4, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="1-3 A's"):
        lora_u(x, [torch.randn(4, 32)], torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32 counters"):
        lora_u(x, [torch.randn(4, 64)] * 3, torch.zeros(2, dtype=torch.int32))


def test_pick_follows_the_measured_variants():
    """Elementwise accumulation up to 8 rows, tensor cores above (session 20's probe)."""
    from gptqlora.kernels import lora_u as L

    assert [L.pick(m)["mode"] for m in (1, 8, 9, 16)] == [1, 1, 2, 2]
