"""Where models run by default: the GPU when there is one, and the dtype that suits it."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A --device this machine does not have."""


def check_device(device: str | torch.device | None, option: str = "--device") -> None:
    """Refuse a device name torch does not know, or a CUDA device this machine lacks (instead of silently
    running on the CPU)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{option} {device}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"{option} {device}: this machine has no CUDA GPU that torch can use "
                              f"(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"{option} {device}: there are only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type not in ("cpu", "meta") and not getattr(getattr(torch, dev.type, None), "is_available",
                                                         lambda: False)():
        raise DeviceError(f"{option} {device}: no {dev.type} device here; use cpu or cuda")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as given (checked: see `check_device`), else cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, torch.device):
        check_device(device)
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; fp32 elsewhere (half-precision matmuls are slow or missing on CPUs)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def configure_cuda_allocator(expandable_segments: bool) -> bool:
    """Turn on the CUDA caching allocator's expandable segments (segments grow in place instead of new
    fixed-size blocks being added, so freed memory of odd sizes is reused and fragmentation stays low).
    PYTORCH_CUDA_ALLOC_CONF, when set, wins. True if it was turned on here."""
    import os

    if not expandable_segments or "PYTORCH_CUDA_ALLOC_CONF" in os.environ or not torch.cuda.is_available():
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # for processes started from here
    try:  # this process, even if CUDA is already up (the env variable is read only at its start)
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):  # an older torch: the variable still reaches child processes
        return False
    return True
