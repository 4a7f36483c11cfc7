"""SpQR layers (Dettmers et al. 2023) in checkpoint files: low-bit GPTQ codes in small groups whose scales
and zeros are themselves quantized, plus a sparse matrix of fp16 outliers.

Layout of one layer PREFIX (K = in_features, N = out_features, b = bits, G = ceil(K / group_size) groups
of the input dim, sb = stat_bits, S = N / stat_group_size second-level groups of the output dim):

    qweight        int32 [K*b/32, N]     codes, the GPTQ packing (gptqlora.formats.gptq.pack_rows)
    g_idx          int32 [K]             group of each input channel (act-order: processing order)
    scales_code    int32 [G, N*sb/32]    first-level scale codes, packed along N (pack_cols)
    scales_step    fp16  [G, S]          scale = fp16(scales_base + scales_step * code), per S-group
    scales_base    fp16  [G, S]
    zeros_code     int32 [G, N*sb/32]    first-level zero codes, packed along N
    zeros_step     fp16  [G, S]          zero  = zeros_base + zeros_step * code   (fp32, not rounded)
    zeros_base     fp16  [G, S]
    outlier_values fp16  [nnz]           CSR over W [N, K] (row = output channel): the outliers' residuals,
    outlier_cols   int16 [nnz]           so that W = dense + sparse with dense[k, n] = (q - zero) * scale
    outlier_rows   int32 [N+1]           row pointers; columns ascending within a row
    bias           fp16  [N]             optional

`quantization_config`: quant_method "spqr", checkpoint_format "spqr", bits, group_size, stat_bits,
stat_group_size (the layer's own sizes follow from its shapes, so `dynamic` rules may change bits and
group_size per module). Average storage per weight: b + 2*sb/group_size + 64/(group_size*stat_group_size)
+ 32 * outlier fraction bits (`average_bits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from gptqlora.formats.base import FormatError, PackedFormat
from gptqlora.formats.gptq import GPTQSpec, chunk_size, pack_cols, unpack_cols

FORMAT_SPQR = "spqr"
STAT_BITS = (2, 3, 4, 8)
MAX_COLS = 2**15  # int16 column indices
STATS = ("scales_code", "scales_step", "scales_base", "zeros_code", "zeros_step", "zeros_base")
OUTLIERS = ("outlier_values", "outlier_cols", "outlier_rows")
SPQR_TENSORS = ("qweight", "g_idx", *STATS, *OUTLIERS)


@dataclass(frozen=True)
class SpQRSpec:
    in_features: int
    out_features: int
    bits: int
    group_size: int
    stat_bits: int | None = None  # None: not known yet (read from the stored shapes)
    stat_group_size: int | None = None

    def __post_init__(self) -> None:
        GPTQSpec(self.in_features, self.out_features, self.bits, self.group_size)  # the dense part's checks
        if self.in_features > MAX_COLS:
            raise FormatError(f"in_features={self.in_features} exceeds {MAX_COLS}, the largest column index "
                              f"SpQR's int16 outlier columns hold")
        if self.stat_bits is not None:
            if self.stat_bits not in STAT_BITS:
                raise FormatError(f"stat_bits={self.stat_bits}: SpQR statistics pack at {STAT_BITS} bits")
            if self.out_features % chunk_size(self.stat_bits):
                raise FormatError(f"out_features={self.out_features} is not a multiple of "
                                  f"{chunk_size(self.stat_bits)}, which {self.stat_bits}-bit statistics need")
        if self.stat_group_size is not None and (self.stat_group_size < 1 or self.out_features % self.stat_group_size):
            raise FormatError(f"stat_group_size={self.stat_group_size} must divide out_features={self.out_features}")

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size == -1 else math.ceil(self.in_features / self.group_size)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        k, n, g = self.in_features, self.out_features, self.n_groups
        s, sb = n // self.stat_group_size, self.stat_bits
        return {"qweight": (k * self.bits // 32, n), "g_idx": (k,), "scales_code": (g, n * sb // 32),
                "scales_step": (g, s), "scales_base": (g, s), "zeros_code": (g, n * sb // 32),
                "zeros_step": (g, s), "zeros_base": (g, s), "outlier_rows": (n + 1,)}

    def default_g_idx(self) -> torch.Tensor:
        return GPTQSpec(self.in_features, self.out_features, self.bits, self.group_size).default_g_idx()


def average_bits(bits: int, group_size: int, stat_bits: int, stat_group_size: int, outlier_fraction: float) -> float:
    """SpQR's storage per weight: codes + first-level stat codes + second-level fp16 pairs + outliers
    (fp16 value + int16 column)."""
    return bits + 2 * stat_bits / group_size + 64 / (group_size * stat_group_size) + 32 * outlier_fraction


def quantize_stats(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantization of statistics v [..., N] in groups of `group` along N.

    Returns (codes int32 [..., N], step fp16 [..., N/group], base fp16 [..., N/group]);
    `decode_stats` inverts it."""
    *lead, n = v.shape
    g = v.float().reshape(*lead, n // group, group)
    base = g.amin(-1).half()
    step = ((g.amax(-1) - base.float()) / (2**bits - 1)).half()
    safe = step.float().clamp(min=torch.finfo(torch.float16).tiny)
    codes = torch.round((g - base.float()[..., None]) / safe[..., None]).clamp(0, 2**bits - 1)
    codes = torch.where(step.float()[..., None] > 0, codes, torch.zeros_like(codes))
    return codes.reshape(*lead, n).to(torch.int32), step, base


def decode_stats(codes: torch.Tensor, step: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """fp32 [..., N] = base + step * code, each second-level group of N / step.shape[-1] channels."""
    group = codes.shape[-1] // step.shape[-1]
    s = step.float().repeat_interleave(group, -1)
    b = base.float().repeat_interleave(group, -1)
    return b + s * codes.float()


def decode_scales(codes: torch.Tensor, step: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """First-level scales, rounded to fp16 as GPTQ's stored scales are."""
    return decode_stats(codes, step, base).half()


def csr_from_mask(mask: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask, values [N, K] -> CSR (values fp16 [nnz], cols int16 [nnz], row pointers int32 [N+1])."""
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: rows ascending, columns ascending within
    counts = torch.bincount(rows, minlength=mask.shape[0])
    ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    ptr[1:] = counts.cumsum(0)
    return values[rows, cols].half(), cols.to(torch.int16), ptr.to(torch.int32)


def csr_rows(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row (output channel) of each stored outlier, int64 [nnz]."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=row_ptr.device), counts, output_size=nnz)


class SpQRFormat(PackedFormat):
    method = FORMAT_SPQR
    name = FORMAT_SPQR
    marker = "qweight"
    stored = SPQR_TENSORS
    universal = False  # gptqlora's reader and writer; GPTQ loaders do not read it
    fold_format = None  # no exact in-place adapter merge

    def check_bits(self, bits: int) -> None:
        GPTQSpec(32, 32, bits, -1)

    def spec(self, in_features: int, out_features: int, bits: int, group_size: int) -> SpQRSpec:
        return SpQRSpec(in_features, out_features, bits, group_size)

    def shape_from_headers(self, shapes: Mapping[str, tuple[int, ...]], bits: int) -> tuple[int, int]:
        if "qweight" not in shapes:
            raise FormatError("missing tensor 'qweight'")
        return shapes["qweight"][0] * 32 // bits, shapes["qweight"][1]

    def read(self, tensors: Mapping[str, torch.Tensor], spec: SpQRSpec, where: str = "") -> dict[str, torch.Tensor]:
        missing = [n for n in SPQR_TENSORS if n != "g_idx" and n not in tensors]
        if missing:
            raise FormatError(f"{where}missing SpQR tensor(s) {missing}")
        n = spec.out_features
        s = tensors["scales_step"].shape[-1]
        if s == 0 or n % s:
            raise FormatError(f"{where}'scales_step' has {s} second-level groups, which do not divide "
                              f"out_features={n}")
        stat_bits = tensors["scales_code"].shape[-1] * 32 // n if n else 0
        full = SpQRSpec(spec.in_features, n, spec.bits, spec.group_size, stat_bits, n // s)
        out = {k: tensors[k] for k in SPQR_TENSORS if k in tensors}
        out.setdefault("g_idx", full.default_g_idx().to(tensors["qweight"].device))
        for name, shape in full.shapes().items():
            if tuple(out[name].shape) != shape:
                raise FormatError(f"{where}'{name}' has shape {tuple(out[name].shape)}, but bits={spec.bits}, "
                                  f"group_size={spec.group_size}, stat_bits={stat_bits}, stat_group_size={n // s}, "
                                  f"in={spec.in_features}, out={n} imply {shape}")
        nnz = out["outlier_values"].shape[0]
        if out["outlier_cols"].shape != (nnz,) or int(out["outlier_rows"][-1]) != nnz or int(out["outlier_rows"][0]):
            raise FormatError(f"{where}the outlier CSR is inconsistent: {nnz} values, {out['outlier_cols'].shape[0]} "
                              f"columns, row pointers from {int(out['outlier_rows'][0])} to {int(out['outlier_rows'][-1])}")
        if nnz and (int(out["outlier_cols"].min()) < 0 or int(out["outlier_cols"].max()) >= spec.in_features):
            raise FormatError(f"{where}outlier column indices outside [0, {spec.in_features})")
        for k in ("scales_step", "scales_base", "zeros_step", "zeros_base", "outlier_values"):
            out[k] = out[k].to(torch.float16)
        out["outlier_cols"] = out["outlier_cols"].to(torch.int16)
        for k in ("qweight", "g_idx", "scales_code", "zeros_code", "outlier_rows"):
            out[k] = out[k].to(torch.int32)
        return out

    def write(self, buffers: Mapping[str, torch.Tensor], spec: SpQRSpec, where: str = "") -> dict[str, torch.Tensor]:
        return {k: buffers[k] for k in SPQR_TENSORS}


def pack_stats(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Stat codes [G, N] -> int32 [G, N*bits/32]."""
    return pack_cols(codes, bits)


def unpack_stats(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_cols(packed, bits)
