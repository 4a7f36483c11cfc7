"""SpQR sibling projections (q|k|v, gate|up) decoded by one tensor-core launch instead of one per layer.

Why: at decode sizes a layer call is mostly a chain of round trips to memory, not bytes (docs/benchmarks.md,
sessions 16-22). GPTQ's siblings share one launch since session 11 (nn/sibling_gemv.py); SpQR's still made
seven launches a block (session 22, H100: the 7B's SpQR layers 22-51 us each at one row). As one launch the
siblings' blocks fill the card together and pay the chain once.

How: each layer's tensor-core plan (`SpQRLinear.mma_plan`: fragment-ordered codes, statistics' codes and their
second-level steps and bases, outliers in packed-row order) is put side by side along N once, as
non-persistent buffers of the leader; the kernel's `bounds` give each column block its projection's LoRA
rows, and everything else it reads per column (statistics, outliers) is indexed by the column, so the
concatenation is the whole change. The siblings must share what one launch reads once: the input width, code
and statistics widths and groups, and the row order (act-order layers quantized on one input have one: q/k/v
see the same Hessian, so do gate/up). Otherwise `group_plan` says None and the layers decode one by one.

Off until it is timed on a GPU (`ENV`): written after session 22, checked on the CPU by emulating the kernel
on the concatenated plan (tests/nn/test_spqr_siblings.py).
"""

from __future__ import annotations

import os

import torch

from gptqlora.nn.sibling_gemv import MIN_COLUMNS, column_bounds, one_row_order
from gptqlora.nn.spqr_linear import SpQRLinear

ENV = "GPTQLORA_SPQR_SIBLINGS"  # "1": SpQR siblings decode in one launch; otherwise one launch a layer


def wanted() -> bool:
    return os.environ.get(ENV, "") == "1"


def _key(bases: list[SpQRLinear]) -> tuple:
    return tuple(b._mma_key for b in bases)  # each layer's own plan key: its tensors, device and the kernel's


def group_plan(bases: list[SpQRLinear]) -> tuple | None:
    """The siblings' shared plan ((slot bits, group), column bounds, widths; the tensors are the leader's
    `group_*` buffers), built once and again when a layer's plan changes; None when they cannot share a
    launch. Under torch.compile the plan built before is used."""
    leader = bases[0]
    if torch.compiler.is_compiling():
        return getattr(leader, "_spqr_group", None)
    plans = [b.mma_plan() for b in bases]  # first: it refreshes each layer's key
    key = _key(bases)
    if getattr(leader, "_spqr_group_key", None) != key:
        leader._spqr_group, leader._spqr_group_key = _build(bases, plans), key
    return leader._spqr_group


def _build(bases: list[SpQRLinear], plans: list[tuple | None]) -> tuple | None:
    from gptqlora.kernels import gemv_mma
    from gptqlora.kernels.gemv import room_for

    leader = bases[0]
    if len(bases) > 3 or not all(type(b) is SpQRLinear for b in bases) or any(p is None or p != plans[0] for p in plans):
        return None
    if len({(b.in_features, b.bits, b.group_size, b.stat_bits, b.stat_group_size) for b in bases}) != 1:
        return None
    n_sg = [b.mma_stats.shape[-1] for b in bases]  # second-level entries per layer: each width a whole number
    if any(b.out_features % n != 0 or b.out_features // n != bases[0].out_features // n_sg[0]
           for b, n in zip(bases, n_sg)):
        return None
    if any(b.out_features % MIN_COLUMNS for b in bases):  # whole column blocks of a projection, as GPTQ's
        return None
    if not one_row_order([b.mma_perm for b in bases]):
        return None  # different act-order row orders: one launch cannot read x for both
    if not room_for(sum(b.mma_frag.numel() * 4 for b in bases), leader.qweight.device):
        return None
    nnz = [int(b.outlier_rows[-1]) for b in bases]  # each layer's CSR row pointers, shifted past the ones before
    rows = torch.cat([b.outlier_rows[:-1] + sum(nnz[:i]) for i, b in enumerate(bases)]
                     + [torch.tensor([sum(nnz)], dtype=torch.int32, device=leader.qweight.device)])
    for name, t in (("group_frag", torch.cat([b.mma_frag for b in bases])),  # (N/16, K/RL, 32, 4) tiles
                    ("group_scales_code", torch.cat([b.scales_code for b in bases], dim=1)),  # (G, N*SB/32) words
                    ("group_zeros_code", torch.cat([b.zeros_code for b in bases], dim=1)),
                    ("group_stats", torch.cat([b.mma_stats for b in bases], dim=-1)),  # (4, G, S1 + S2 [+ S3])
                    ("group_o_vals", torch.cat([b.mma_o_vals for b in bases])),
                    ("group_o_pos", torch.cat([b.mma_o_pos for b in bases])),
                    ("group_o_rows", rows.to(torch.int32)),  # (N1 + N2 [+ N3] + 1,)
                    ("group_o_offs", torch.cat([b.mma_o_offs for b in bases])),  # relative to each row's start
                    ("group_locks", gemv_mma.counters(sum(b.out_features for b in bases), leader.qweight.device))):
        leader.register_buffer(name, t, persistent=False)
    widths = [b.out_features for b in bases]
    return plans[0], column_bounds(widths), tuple(widths)


def decode_group(bases: list[SpQRLinear], x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                 scaling: float) -> tuple[torch.Tensor, ...] | None:
    """Every sibling's y = x @ W + bias + scaling * (x @ Aᵀ) @ Bᵀ from one launch, or None when they cannot
    share one (then each decodes alone): on CUDA, where `ENV` asks, x (..., K) at most 16 rows in the compute
    dtype, one adapter rank and dtype."""
    from gptqlora.kernels.gemv_mma import takes
    from gptqlora.nn.quant_linear import decodes

    if not wanted() or x.device.type != "cuda" or not all(decodes(x, a, b) for a, b in zip(lora_a, lora_b)):
        return None
    if len({(a.shape[0], a.dtype, b.dtype) for a, b in zip(lora_a, lora_b)}) != 1:
        return None
    plan = group_plan(bases)
    x2 = x.reshape(-1, x.shape[-1])
    if plan is None or not takes(x2, bases[0].mma_stats, lora_a, lora_b):
        return None
    (slot, group), bounds, widths = plan
    lead = bases[0]
    y = torch.ops.gptqlora.gemv_mma(x2, lead.group_frag, lead.group_zeros_code, lead.group_scales_code,
                                    lead.mma_perm, lead.group_locks, list(lora_a), list(lora_b), slot, group,
                                    float(scaling), [lead.group_o_vals, lead.group_o_pos, lead.group_o_rows,
                                                     lead.group_o_offs],
                                    [lead.group_stats], lead.stat_bits, list(bounds))
    ys = y.reshape(*x.shape[:-1], y.shape[-1]).split(list(widths), dim=-1)
    return tuple(yi if m.bias is None else yi + m.bias.to(yi.dtype) for yi, m in zip(ys, bases))
