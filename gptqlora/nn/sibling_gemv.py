"""Sibling projections (q|k|v, gate|up) decoded by one small-M launch instead of one per layer.

Why: at decode sizes a layer call costs ~10 us of latency whatever its bytes (bench/tinygemm_probe.py, H200:
a 4-bit 4096x4096 layer with LoRA 11.9 us, three of them side by side as one 4096x12288 launch 22.5 us
instead of 35.7; gate|up 34.3 instead of 44.6). A 7B block makes seven such calls per token; as four, it
saves ~23 us per block, ~0.75 ms per token.

How: the siblings' packed weights (each layer's decode copy, `QuantLinear.gemv_plan`), zeros and scales are
put side by side along N once, as non-persistent buffers of the first layer (the leader); the kernel's
`bounds` give each column block its projection's LoRA rows (kernels/gemv.py). This needs what one launch
can share: the same input width, bits, group size, zero kind, and the same row order (act-order layers
quantized on one input have one g_idx: q/k/v see the same Hessian, so do gate/up). Otherwise, or without
room on the card for the copy, `group_plan` says None and the layers decode one by one. An act-order
layer's own decode copy (rows in group order) becomes a column slice of the siblings' copy, so act-order
models hold no more than before; without act-order the copy is new (0.5 byte per weight at 4 bit, for the
five of seven projections that have siblings).
"""

from __future__ import annotations

import torch

from gptqlora.kernels.dispatch import gemv, resolve
from gptqlora.nn.quant_linear import QuantLinear

MIN_COLUMNS = 32  # each sibling's width must be a multiple of this: whole words of packed zeros (3 bit: 32 columns
# fill 3 words), and a column block lies in one projection


def one_row_order(perms: list[torch.Tensor | None]) -> bool:
    """Whether siblings' act-order row orders (None: rows in order) are one: one launch reads x once for all."""
    return all((q is None) == (perms[0] is None) and (q is None or torch.equal(q, perms[0])) for q in perms)


def column_bounds(widths: list[int]) -> tuple[int, int]:
    """The kernels' `bounds` of siblings side by side: where the second and third projections start."""
    ends = [sum(widths[:i + 1]) for i in range(len(widths))]
    return ends[0], ends[1] if len(ends) == 3 else ends[-1]


def _key(bases: list[QuantLinear]) -> tuple:
    from gptqlora.kernels import gemv_mma

    return tuple((b.qweight.data_ptr(), b.qweight._version, b.g_idx.data_ptr(), b.g_idx._version,
                  b.qzeros.data_ptr(), b.qzeros._version, b.qweight.device)
                 for b in bases) + (gemv_mma.wanted(bases[0].decode_batch, bases[0].bits),)  # as the layers' plans


def group_plan(bases: list[QuantLinear]) -> tuple | None:
    """The siblings' shared decode plan (group size, column bounds, widths; the tensors are the leader's
    buffers group_qweight/zeros/scales/locks), built once (and again when a layer's qweight or g_idx
    change); None when they cannot share a launch. Under torch.compile the plan built before is used
    (gptqlora.inference.prepare_decode builds it)."""
    leader = bases[0]
    if torch.compiler.is_compiling():
        return getattr(leader, "_group_gemv", None)
    if any(resolve(b.kernel, b.qweight.device) != "triton" for b in bases):  # the torch path: layer by layer
        return None
    key = _key(bases)
    if getattr(leader, "_group_gemv_key", None) != key:
        leader._group_gemv, leader._group_gemv_key = _build(bases), key
    return leader._group_gemv


def _build(bases: list[QuantLinear]) -> tuple | None:
    from gptqlora.kernels.gemv import room_for

    leader = bases[0]
    same = {(b.in_features, b.bits, b.group_size, b.float_zeros) for b in bases}
    if len(same) != 1 or not all(type(b) is QuantLinear for b in bases) or len(bases) > 3:
        return None
    if any(b.out_features % MIN_COLUMNS for b in bases):
        return None
    plans = [b.gemv_plan() for b in bases]
    if any(p is None or not p[3] or p[4] != plans[0][4] for p in plans):  # the Triton path, rows in group order
        return None
    if not one_row_order([p[1] for p in plans]):
        return None  # different act-order row orders: one launch cannot read x for both
    if not room_for(sum(p[0].numel() * 4 for p in plans), leader.qweight.device):
        return None
    frag = plans[0][0].dim() == 4  # gemv_mma's copies: (N_p/16, ...) tiles, side by side along dim 0
    if any((p[0].dim() == 4) != frag for p in plans):
        return None
    qweight = torch.cat([p[0] for p in plans], dim=0 if frag else 1)  # (K*b/32, N1 + N2 [+ N3]) or tiles
    zeros = torch.cat([b.decode_zeros for b in bases], dim=1)  # (3-bit codes in 4-bit slots: their zeros too)
    scales = torch.cat([b.scales for b in bases], dim=1)
    from gptqlora.kernels import gemv_mma

    locks = gemv_mma.counters(sum(b.out_features for b in bases), qweight.device)
    for name, t in (("group_qweight", qweight), ("group_zeros", zeros), ("group_scales", scales),
                    ("group_locks", locks)):
        leader.register_buffer(name, t, persistent=False)
    widths = [b.out_features for b in bases]
    ends = [sum(widths[:i + 1]) for i in range(len(widths))]
    for b, n0, n1 in zip(bases, [0] + ends[:-1], ends):  # an act-order layer's own copy: now a slice of this one
        if b.gemv_qweight is not None and frag:
            b.gemv_qweight = qweight[n0 // 16:n1 // 16]  # contiguous tiles
        elif b.gemv_qweight is not None:
            b.gemv_qweight = qweight[:, n0:n1]  # (K*b/32, N_p), row stride N1 + N2 [+ N3]: read as such
    # group, column bounds, widths; the tensors are the leader's
    return plans[0][4], column_bounds(widths), tuple(widths)


def decode_group(bases: list[QuantLinear], x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                 scaling: float) -> tuple[torch.Tensor, ...] | None:
    """Every sibling's y = x @ W + bias + scaling * (x @ Aᵀ) @ Bᵀ from one launch, or None when they cannot
    share one (then each decodes alone). x (..., K) with at most 16 rows, in the compute dtype."""
    if torch.is_grad_enabled() and (x.requires_grad or any(a.requires_grad or b.requires_grad
                                                           for a, b in zip(lora_a, lora_b))):
        return None
    if len({(a.shape[0], a.dtype, b.dtype) for a, b in zip(lora_a, lora_b)}) != 1:  # one rank and dtype
        return None
    plan = group_plan(bases)
    if plan is None:
        return None
    group, bounds, widths = plan
    leader = bases[0]
    qweight = leader.group_qweight
    read = (qweight, leader.gemv_perm, leader.group_locks, True, group)  # perm: every sibling's (checked equal)
    y = gemv(x, qweight, leader.group_zeros, leader.group_scales, leader.g_idx, leader.bits, read, list(lora_a),
             list(lora_b), scaling, bounds, ahead=leader.decode_ahead)  # (..., N1 + N2 [+ N3]); each A, B where it is
    ys = y.split(list(widths), dim=-1)
    return tuple(yi if m.bias is None else yi + m.bias.to(yi.dtype) for yi, m in zip(ys, bases))
