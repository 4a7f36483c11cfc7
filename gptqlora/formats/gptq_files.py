"""GPTQ layers in checkpoint files: the v1 (`gptq`), v2 (`gptq_v2`) and float-zeros formats.

In memory a GPTQ layer holds qweight, qzeros, scales and g_idx with true (v2) zeros: packed int32, or a
float [G, N] tensor after an exact QA-LoRA merge. On disk:
    gptq                 qzeros store zero - 1 (AutoGPTQ, GPTQ-for-LLaMa, most Hub checkpoints)
    gptq_v2              qzeros store the true zero (GPTQModel)
    gptq_v2_float_zeros  v2, where folded layers store float `zeros` [G, N] instead of qzeros (gptqlora only)
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from gptqlora.formats.base import FormatError, PackedFormat
from gptqlora.formats.gptq import (FORMAT_V1, FORMAT_V2, FORMAT_V2_FLOAT_ZEROS, GPTQSpec, check_bits,
                                   zeros_v1_to_v2, zeros_v2_to_v1)

log = logging.getLogger(__name__)

PACKED = ("qweight", "qzeros", "scales", "g_idx")  # the standard layout, also the in-memory buffer names


class GPTQFormat(PackedFormat):
    method = "gptq"
    marker = "qweight"
    stored = (*PACKED, "zeros")

    def __init__(self, name: str, zero_offset: int, float_zeros: bool = False) -> None:
        self.name = name
        self.zero_offset = zero_offset  # stored = true zero - offset (1 in v1)
        self.float_zeros = float_zeros
        self.universal = name == FORMAT_V1
        self.fold_format = FORMAT_V2_FLOAT_ZEROS

    @property
    def smallest_zero(self) -> int:
        """The smallest true zero this format can store (v1 cannot store 0: it would be written as -1)."""
        return self.zero_offset

    def check_bits(self, bits: int) -> None:
        check_bits(bits)

    def spec(self, in_features: int, out_features: int, bits: int, group_size: int) -> GPTQSpec:
        return GPTQSpec(in_features, out_features, bits, group_size)

    def shape_from_headers(self, shapes: Mapping[str, tuple[int, ...]], bits: int) -> tuple[int, int]:
        if "qweight" not in shapes or "scales" not in shapes:
            raise FormatError(f"missing tensor '{'qweight' if 'qweight' not in shapes else 'scales'}'")
        return shapes["qweight"][0] * 32 // bits, shapes["scales"][1]

    def read(self, tensors: Mapping[str, torch.Tensor], spec: GPTQSpec, where: str = "") -> dict[str, torch.Tensor]:
        out = {k: tensors[k] for k in PACKED if k in tensors}
        if self.float_zeros and "zeros" in tensors:  # a folded layer: float true zeros
            zeros = tensors["zeros"].float()
            if tuple(zeros.shape) != (spec.n_groups, spec.out_features):
                raise FormatError(f"{where}'zeros' has shape {tuple(zeros.shape)}, expected "
                                  f"{(spec.n_groups, spec.out_features)}")
            spec.check(out, where, skip=("qzeros",))
            out["qzeros"] = zeros
        else:
            spec.check(out, where)
            if self.zero_offset:
                out["qzeros"], wrapped = zeros_v1_to_v2(out["qzeros"], spec.bits)
                if wrapped:
                    log.warning("%s%d v1 zero field(s) hold -1 (true zero 0, the v1 overflow); read as 0",
                                where, wrapped)
        out["scales"] = out["scales"].to(torch.float16)
        device = out["qweight"].device
        out["g_idx"] = out.get("g_idx", spec.default_g_idx().to(device)).to(torch.int32)
        return out

    def write(self, buffers: Mapping[str, torch.Tensor], spec: GPTQSpec, where: str = "") -> dict[str, torch.Tensor]:
        zeros = buffers["qzeros"]
        out = {"qweight": buffers["qweight"]}
        if zeros.is_floating_point():
            if not self.float_zeros:
                raise FormatError(f"{where}the zero points are floats (an exact QA-LoRA merge), which only the "
                                  f"{FORMAT_V2_FLOAT_ZEROS} format stores, not {self.name}")
            out["zeros"] = zeros.float()
        elif self.zero_offset:
            out["qzeros"] = zeros_v2_to_v1(zeros, spec.bits, where)
        else:
            out["qzeros"] = zeros
        out["scales"] = buffers["scales"].to(torch.float16)
        out["g_idx"] = buffers["g_idx"].to(torch.int32)
        return out


GPTQ_FORMATS = (GPTQFormat(FORMAT_V1, zero_offset=1), GPTQFormat(FORMAT_V2, zero_offset=0),
                GPTQFormat(FORMAT_V2_FLOAT_ZEROS, zero_offset=0, float_zeros=True))
