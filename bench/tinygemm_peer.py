"""PyTorch's own int4 kernel (tinygemm: `torch.ops.aten._weight_int4pack_mm`) on GPTQ layers: a decode peer.

Why it is measured: our small-M Triton kernel (gptqlora/kernels/gemv.py) reads 4-bit weights at 28-38% of
the copy bandwidth, and four redesigns of it did not get faster on the H200. tinygemm is the int4 kernel
PyTorch ships for CUDA (sm80+), the one gpt-fast and torchao's int4 weight-only path decode with; nothing to
install. If it were faster, decoding should use it ("a well-kept library where one does the job").
It is not (bench/tinygemm_probe.py, H200, 2026-12-03, docs/benchmarks.md "Session 9"): at one token
13.3 us against our 10.5 us for a 4-bit 4096x4096 layer without LoRA, and with the LoRA update as two
matmuls beside it 25.1 us against our fused 11.9; a 7B decoded at 0.81x bf16 through it, 1.17x through ours.
At 8 tokens without LoRA it is 10-15% faster than ours, with LoRA slower. So it stays a benchmark peer.

Its format and how GPTQ maps onto it, per column n and group j of `group` consecutive rows:

    tinygemm:  W[k, n] = (q[k, n] - 8) * scale[j, n] + zero[j, n]        scale, zero bf16 [K/group, N, 2]
    GPTQ:      W[k, n] = s[j, n] * (q[k, n] - z[j, n])                   s fp16, z integer (v2: the true zero)

so scale = s and zero = s * (8 - z), rounded once to bf16 (the only change of numerics: bf16 keeps 8
mantissa bits where fp16 scales have 11; the dense bf16 W of the training path rounds every weight to 8
bits too). Codes of fewer than 4 bits are the same integers in a 4-bit field (2 and 3 bit: read as 4 bit,
which doubles a 2-bit layer's bytes read; bench/tinygemm_probe.py measures whether that still wins).
An act-order layer's rows are put in group order once (tinygemm's groups are contiguous rows) and x is read
through the same permutation (`perm`). Limits (tinygemm's): bf16 activations, group 32/64/128/256,
K divisible by 16 x inner_k_tiles, N by 8.

The LoRA update is two small matmuls beside it, on x in its own order: y += scaling * (x Aᵀ) Bᵀ.
On the CPU the same math runs through `_weight_int4pack_mm_for_cpu` (a different packed layout, same
formula): that is what the CPU tests check, the conversion above; the CUDA packing is torch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptqlora.formats.gptq import unpack_rows, unpack_zeros

GROUPS = (32, 64, 128, 256)  # the group sizes tinygemm takes
INNER_K_TILES = 8  # rows per packed K-tile / 16 (2, 4 or 8); 8 reads the longest runs per thread


@dataclass(frozen=True)
class TinyPlan:
    """One layer in tinygemm's layout: `packed` int32 (device-specific layout), `scale_zeros` bf16
    [K/group, N, 2], `perm` (x column of each packed row, act-order) or None, `group`."""

    packed: torch.Tensor
    scale_zeros: torch.Tensor
    perm: torch.Tensor | None
    group: int


def why_not(bits: int, group_size: int, k: int, n: int, float_zeros: bool, g_idx: torch.Tensor | None = None) -> str | None:
    """Why this layer cannot run through tinygemm (a phrase), or None if it can."""
    gs = k if group_size == -1 else group_size
    if bits > 4:
        return f"{bits}-bit codes do not fit tinygemm's 4-bit field"
    if float_zeros:
        return "float zeros (a QA-LoRA merge)"
    if gs not in GROUPS:
        return f"group size {gs} (tinygemm takes {GROUPS})"
    if k % (16 * INNER_K_TILES) or n % 8:
        return f"shape {k}x{n} (K must divide by {16 * INNER_K_TILES}, N by 8)"
    if g_idx is not None and _group_order(g_idx, gs) is False:
        return "a g_idx without GPTQ's group structure"
    return None


def _group_order(g_idx: torch.Tensor, group: int) -> torch.Tensor | None | bool:
    """The permutation putting rows in group order (None: they are already), or False if the groups are
    not `group` rows each. One host sync."""
    g = g_idx.to(torch.int64)
    expected = torch.arange(g.shape[0], device=g.device) // group
    if torch.equal(g, expected):
        return None
    perm = torch.argsort(g, stable=True)
    return perm if torch.equal(g[perm], expected) else False


def plan_tinygemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                  bits: int, group_size: int, inner_k_tiles: int = INNER_K_TILES) -> TinyPlan:
    """Repack one GPTQ layer (qweight [K*b/32, N], packed v2 zeros, fp16 scales [G, N], g_idx [K]) for
    tinygemm on qweight's device. Raises ValueError where `why_not` says it cannot."""
    k, n = g_idx.shape[0], qweight.shape[1]
    reason = why_not(bits, group_size, k, n, qzeros.is_floating_point(), g_idx)
    if reason:
        raise ValueError(f"tinygemm cannot take this layer: {reason}")
    gs = k if group_size == -1 else group_size
    perm = _group_order(g_idx, gs)
    q = unpack_rows(qweight, bits).to(torch.int32)  # (K, N) codes
    if perm is not None:
        q = q[perm]
    g = g_idx.long() if perm is None else g_idx.long()[perm]
    s = scales.float()[g[::gs]]  # (K/gs, N): the group of each run of gs rows, in the packed order
    z = unpack_zeros(qzeros, bits).float()[g[::gs]]
    scale_zeros = torch.stack([s, s * (8.0 - z)], dim=-1).to(torch.bfloat16).contiguous()  # (K/gs, N, 2)
    qt = q.t().contiguous()  # (N, K)
    if qweight.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qt, inner_k_tiles)
    else:  # [N][K/2] bytes, two codes per byte, the even row in the high nibble (torch's convention)
        nib = ((qt[:, ::2] << 4) | qt[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(nib, inner_k_tiles)
    return TinyPlan(packed, scale_zeros, None if perm is None else perm.to(torch.int32), gs)


def tinygemm_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, perm: torch.Tensor | None,
                    group: int, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                    scaling: float = 1.0) -> torch.Tensor:
    """x (M, K) bf16 -> (M, N) bf16: x @ dequant(W) [+ scaling * (x @ Aᵀ) @ Bᵀ]. No gradient."""
    xp = x if perm is None else x.index_select(1, perm)  # (M, K) in the packed row order
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xp, packed, group, scale_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm(xp, packed, group, scale_zeros)  # (M, N)
    if lora_a is not None:
        y = y + scaling * ((x @ lora_a.to(x.dtype).t()) @ lora_b.to(x.dtype).t())  # (M, r) @ (r, N)
    return y
