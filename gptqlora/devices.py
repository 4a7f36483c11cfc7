"""Where models run by default: the GPU when there is one, and the dtype that suits it."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as given, else cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; fp32 elsewhere (half-precision matmuls are slow or missing on CPUs)."""
    return torch.float16 if device.type == "cuda" else torch.float32
