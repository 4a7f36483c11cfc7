"""Random packed GPTQ layers for kernel tests: fresh codes, zeros, scales and group maps per case."""

from __future__ import annotations

import torch

from gptqlora.formats.gptq import pack_cols, pack_rows


def random_packed(k: int, n: int, bits: int, group_size: int, act_order: bool, float_zeros: bool,
                  seed: int, device: str | torch.device = "cpu") -> dict:
    """qweight/zeros/scales/g_idx of a random layer, plus the float64 dense W [K, N] they encode."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    n_groups = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, maxq + 1, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, maxq + 1, (n_groups, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(n_groups, n, generator=g) * 0.02 + 1e-3).half()
    g_idx = torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    zp = (zeros.double() + torch.rand(n_groups, n, generator=g, dtype=torch.float64) - 0.5) if float_zeros \
        else zeros.double()
    gi = g_idx.long()
    w = (codes.double() - zp[gi]) * scales.double()[gi]  # (K, N)
    packed = {"qweight": pack_rows(codes, bits), "zeros": zp.float() if float_zeros else pack_cols(zeros, bits),
              "scales": scales, "g_idx": g_idx}
    return {**{k_: v.to(device) for k_, v in packed.items()}, "w64": w}
