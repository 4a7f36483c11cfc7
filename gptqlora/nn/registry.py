"""The format seam: each stored format with the frozen layer that holds it in memory.

    entry = FORMATS.lookup("gptq", "gptq_v2")      # quant_method, checkpoint_format (None: the default)
    entry.format                                   # tensor names, checks, read/write (gptqlora.formats)
    entry.layer                                    # the nn.Module class: from_packed, packed_state, dequantize

The loader, the writers, merge, export, the SVD init and the quantization driver ask this registry;
nothing else knows a format's tensor names. A new format registers one entry:

    FORMATS.register(MyFormat(), MyLinear)

where MyLinear implements the `PackedLayer` protocol below. The registry is the one module-level object
here by design (like `codecs`): a process knows one set of formats.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from gptqlora.formats.base import FormatError, PackedFormat
from gptqlora.formats.gptq_files import GPTQ_FORMATS
from gptqlora.formats.spqr import SpQRFormat
from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.nn.spqr_linear import SpQRLinear


class PackedLayer(Protocol):
    """What a frozen packed layer provides (besides forward). PEFT wraps it with GPTQLoraLinear; it reads
    `infeatures`/`outfeatures` for the adapter's shape and `qweight` (the main packed tensor) for its device."""

    in_features: int
    out_features: int
    qweight: torch.Tensor
    spec: Any  # the format's shape facts (`PackedFormat.spec`)
    bias: torch.Tensor | None

    @classmethod
    def from_packed(cls, spec: Any, buffers: dict[str, torch.Tensor], bias: torch.Tensor | None = None): ...
    def packed_state(self) -> dict[str, torch.Tensor]: ...
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...  # dense W [K, N]


@dataclass(frozen=True)
class Entry:
    format: PackedFormat
    layer: type


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._default: dict[str, str] = {}  # method -> the format a config without checkpoint_format means

    def register(self, fmt: PackedFormat, layer: type, default: bool = False) -> Entry:
        if fmt.name in self._entries:
            raise ValueError(f"format {fmt.name!r} is already registered")
        entry = Entry(fmt, layer)
        self._entries[fmt.name] = entry
        if default or fmt.method not in self._default:
            self._default[fmt.method] = fmt.name
        return entry

    def unregister(self, name: str) -> None:
        entry = self._entries.pop(name)
        if self._default.get(entry.format.method) == name:
            rest = [n for n, e in self._entries.items() if e.format.method == entry.format.method]
            if rest:
                self._default[entry.format.method] = rest[0]
            else:
                del self._default[entry.format.method]

    @contextlib.contextmanager
    def registered(self, fmt: PackedFormat, layer: type) -> Iterator[Entry]:
        """Register for the duration of a `with` block (tests, plugins tried out)."""
        entry = self.register(fmt, layer)
        try:
            yield entry
        finally:
            self.unregister(fmt.name)

    def lookup(self, method: str | None, name: str | None = None) -> Entry:
        """The entry for a checkpoint's quant_method and checkpoint_format (either may be None)."""
        method = method.lower() if isinstance(method, str) else method
        if name is None:
            if method not in self._default:
                raise FormatError(f"quant_method {method!r} is not one gptqlora reads (known: "
                                  f"{', '.join(sorted(self._default))})")
            name = self._default[method]
        entry = self._entries.get(name)
        if entry is None:
            raise FormatError(f"unsupported checkpoint format {name!r}; supported: {tuple(self._entries)}")
        if method is not None and entry.format.method != method:
            raise FormatError(f"checkpoint format {name!r} belongs to quant_method {entry.format.method!r}, "
                              f"not {method!r}")
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def layer_classes(self) -> tuple[type, ...]:
        return tuple(dict.fromkeys(e.layer for e in self._entries.values()))

    def is_packed(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_classes())


def _builtin() -> Registry:
    reg = Registry()
    for fmt in GPTQ_FORMATS:
        reg.register(fmt, QuantLinear)
    reg.register(SpQRFormat(), SpQRLinear)
    return reg


FORMATS = _builtin()
