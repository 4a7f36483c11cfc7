"""The adapter's u = x Aᵀ for up to three sibling projections in one launch (decode: M <= 16 tokens).

    u[p] = x @ A_p.T        x (M, K), A_p (r, K) fp32 or x's dtype  ->  u (P, M, r) fp32

Why a kernel of its own: the tensor-core decode kernel (gemv_mma.cu) computed each split's share of u in every
block, ~1,400 blocks a 4096x22016 layer, and the adapter took 26 of its 55 us there (session 17, H100). Computed
once per call, the decode kernel only adds u Bᵀ in one split. Three cuBLAS calls and a stack would be four
launches per sibling group; this is one: a program per (projection, rank), each reading its row of A once and x
(L2-resident) in BK-wide tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_u_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, u_ptr, M, K, R, BM: tl.constexpr, BK: tl.constexpr):
    p = tl.program_id(0)  # projection
    r = tl.program_id(1)  # rank
    if p == 0:
        a_ptr = a0_ptr
    elif p == 1:
        a_ptr = a1_ptr
    else:
        a_ptr = a2_ptr
    offs_m = tl.arange(0, BM)
    acc = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & mk[None, :],
                     other=0.0).to(tl.float32)  # (BM, BK)
        a = tl.load(a_ptr + r * K + offs_k, mask=mk, other=0.0).to(tl.float32)  # (BK,)
        acc += tl.sum(xt * a[None, :], axis=1)
    tl.store(u_ptr + (p * M + offs_m) * R + r, acc, mask=offs_m < M)


def lora_u(x: torch.Tensor, lora_a: list[torch.Tensor]) -> torch.Tensor:
    """x (M, K) contiguous, 1-3 A's (r, K) of one rank and dtype -> u (P, M, r) fp32."""
    m, k = x.shape
    r = lora_a[0].shape[0]
    if not 1 <= len(lora_a) <= 3 or m > 16 or any(a.shape != (r, k) for a in lora_a):
        raise ValueError(f"lora_u: 1-3 A's of shape (r, {k}) and at most 16 rows of x, got "
                         f"{[tuple(a.shape) for a in lora_a]} and {m} rows")
    a = [t.contiguous() for t in lora_a]
    a += [a[-1]] * (3 - len(a))
    u = torch.empty(len(lora_a), m, r, dtype=torch.float32, device=x.device)
    _lora_u_kernel[(len(lora_a), r)](x.contiguous(), a[0], a[1], a[2], u, m, k, r,
                                     BM=max(2, triton.next_power_of_2(m)), BK=256, num_warps=4)
    return u


def projections(bounds: tuple[int, int] | None, n: int) -> int:
    """How many sibling projections `bounds` (n1, n2) make of N = n columns: 1 without bounds, else 2 or 3."""
    return 1 if bounds is None else 2 + (bounds[1] < n)


def u_slots(x: torch.Tensor, a_slots: list[torch.Tensor], bounds: tuple[int, int] | None, n: int) -> list[torch.Tensor]:
    """The decode kernels' three A slots (gemv_m1.lora_slots', padded with the last) with each projection's
    u = x Aᵀ, (M, r) fp32, in its A's place, padded alike."""
    count = projections(bounds, n)
    u = lora_u(x, a_slots[:count])
    return [u[min(p, count - 1)] for p in range(3)]


def lora_u_reference(x: torch.Tensor, lora_a: list[torch.Tensor]) -> torch.Tensor:
    """The same in torch (fp32)."""
    return torch.stack([x.float() @ a.float().t() for a in lora_a])
