"""The GPTQ packed layout: pack/unpack integer codes and zero points, v1/v2 zero conventions.

Layout (K = in_features, N = out_features, b = bits, G = number of groups):
    qweight int32 [K*b/32, N]   codes packed along the input dim
    qzeros  int32 [G, N*b/32]   zero points packed along the output dim
    scales  fp16  [G, N]
    g_idx   int32 [K]           group of each input channel
Values are packed little-end first: value j of a chunk sits at bit b*j of the chunk's bit stream, which
for 3 bit straddles word boundaries (32 values fill 3 words). See shared docs/gptq-format.md.

Zero conventions: v2 (`gptq_v2`) stores the true zero; v1 (`gptq`, AutoGPTQ and most Hub checkpoints)
stores zero - 1. Everything in gptqlora holds v2 in memory and converts at the file boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptqlora.formats.base import FormatError
from gptqlora.formats.names import FORMAT_V1, FORMAT_V2, FORMAT_V2_FLOAT_ZEROS, SUPPORTED_BITS  # noqa: F401


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"unsupported bits={bits}; GPTQ packing supports {SUPPORTED_BITS}")
    return bits


def chunk_size(bits: int) -> int:
    """Values per packing chunk: the smallest count whose bits fill whole int32 words (32 for 3 bit)."""
    return 32 // math.gcd(32, check_bits(bits))


@dataclass(frozen=True)
class GPTQSpec:
    """Shape facts of one quantized linear layer."""

    in_features: int
    out_features: int
    bits: int
    group_size: int  # -1: one group over all inputs

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size == 0 or self.group_size < -1:
            raise FormatError(f"group_size must be -1 or positive, got {self.group_size}")
        m = chunk_size(self.bits)  # a dim packed at `bits` must be a multiple of this
        if self.in_features % m:
            raise FormatError(f"in_features={self.in_features} is not a multiple of {m}, "
                              f"which {self.bits}-bit packing needs")
        if self.out_features % m:
            raise FormatError(f"out_features={self.out_features} is not a multiple of {m}, "
                              f"which {self.bits}-bit zero packing needs")

    @property
    def n_groups(self) -> int:
        if self.group_size == -1:
            return 1
        return math.ceil(self.in_features / self.group_size)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        k, n, b, g = self.in_features, self.out_features, self.bits, self.n_groups
        return {"qweight": (k * b // 32, n), "qzeros": (g, n * b // 32), "scales": (g, n), "g_idx": (k,)}

    def default_g_idx(self) -> torch.Tensor:
        gs = self.in_features if self.group_size == -1 else self.group_size
        return (torch.arange(self.in_features, dtype=torch.int32) // gs).to(torch.int32)

    def check(self, tensors: dict[str, torch.Tensor], where: str = "", skip: tuple[str, ...] = ()) -> None:
        """Raise FormatError if packed tensors disagree with this spec (names in `skip` are not checked)."""
        for name, shape in self.shapes().items():
            if name in skip:
                continue
            t = tensors.get(name)
            if t is None:
                if name == "g_idx":
                    continue  # some writers omit g_idx when it is trivial
                raise FormatError(f"{where}missing tensor '{name}'")
            if tuple(t.shape) != shape:
                raise FormatError(f"{where}'{name}' has shape {tuple(t.shape)}, but bits={self.bits}, "
                                  f"group_size={self.group_size}, in={self.in_features}, "
                                  f"out={self.out_features} imply {shape}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [R, C] (values in [0, 2**bits)) along dim 0 -> int32 [R*bits/32, C]."""
    c = chunk_size(bits)
    r, cols = q.shape
    if r % c:
        raise FormatError(f"cannot pack {r} rows at {bits} bit: need a multiple of {c}")
    q = q.to(torch.int64)
    if q.numel() and (q.min() < 0 or q.max() > 2**bits - 1):
        raise FormatError(f"codes out of range for {bits} bit: [{int(q.min())}, {int(q.max())}]")
    q = q.reshape(r // c, c, cols)  # (chunks, values per chunk, C)
    n_words = c * bits // 32
    words = torch.zeros(r // c, n_words, cols, dtype=torch.int64, device=q.device)
    for j in range(c):
        pos = bits * j
        w, off = divmod(pos, 32)
        words[:, w] |= (q[:, j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # straddles into the next word (3 bit only)
            words[:, w + 1] |= q[:, j] >> (32 - off)
    return _to_int32(words.reshape(r // c * n_words, cols))


def unpack_rows(packed: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of pack_rows: int32 [R*bits/32, C] -> int32 codes [R, C]."""
    c = chunk_size(bits)
    n_words = c * bits // 32
    pr, cols = packed.shape
    if pr % n_words:
        raise FormatError(f"{pr} packed rows is not a multiple of {n_words} words ({bits} bit)")
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(pr // n_words, n_words, cols)
    mask = 2**bits - 1
    out = torch.empty(pr // n_words, c, cols, dtype=torch.int64, device=packed.device)
    for j in range(c):
        w, off = divmod(bits * j, 32)
        v = words[:, w] >> off
        if off + bits > 32:
            v = v | (words[:, w + 1] << (32 - off))
        out[:, j] = v & mask
    out = out.reshape(pr // n_words * c, cols).to(torch.int32)
    if rows is not None and rows != out.shape[0]:
        raise FormatError(f"expected {rows} unpacked rows, packed data holds {out.shape[0]}")
    return out


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [R, C] along dim 1 -> int32 [R, C*bits/32] (the qzeros layout)."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int | None = None) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


def unpack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zero points [G, N]: packed int32 v2 zeros [G, N*b/32] unpacked, float zeros [G, N] as they are.

    A layer holds either: packed integer zeros, or float zeros where an exact QA-LoRA merge moved them off
    the integers (format gptq_v2_float_zeros).
    """
    return zeros if zeros.is_floating_point() else unpack_cols(zeros, bits)


def zeros_v1_to_v2(qzeros_v1: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """Convert packed v1 zeros (stored = zero - 1) to v2 (true zero).

    A v1 field holding all ones (maxq) can only come from a true zero of 0 written as -1 by a masking
    writer (a true zero of maxq + 1 is impossible), so it maps back to 0. Returns (qzeros_v2, n_wrapped).
    """
    z = unpack_cols(qzeros_v1, bits).to(torch.int64)
    maxq = 2**bits - 1
    wrapped = int((z == maxq).sum())
    z = (z + 1) & maxq
    return pack_cols(z, bits), wrapped


def zeros_v2_to_v1(qzeros_v2: torch.Tensor, bits: int, where: str = "") -> torch.Tensor:
    """Convert packed v2 zeros to v1. A true zero of 0 has no v1 encoding: refuse rather than corrupt."""
    z = unpack_cols(qzeros_v2, bits).to(torch.int64)
    bad = int((z == 0).sum())
    if bad:
        raise FormatError(
            f"{where}{bad} zero point(s) are 0, which the v1 'gptq' format cannot store (stored zero - 1 "
            f"would be -1 and overflow its {bits}-bit field). Save with format 'gptq_v2', or quantize "
            f"with --sym.")
    return pack_cols(z - 1, bits)


def v1_overflow_count(qzeros_v2: torch.Tensor, bits: int) -> int:
    """How many zero fields would overflow if written as v1."""
    return int((unpack_cols(qzeros_v2, bits) == 0).sum())
