"""What every stored packed format provides: its tensor names and the conversions at the file boundary.

A checkpoint's `quantization_config` names a method (`quant_method`) and a format (`checkpoint_format`).
For each format, a `PackedFormat` says which tensors a packed layer stores under its module name
(PREFIX.<name>), checks them against the layer's shape, and converts them to the layer's in-memory
buffers on reading and back on writing. The frozen layer that holds the buffers, and computes its dense
weight, is bound to the format in `gptqlora.nn.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:  # annotations only: FormatError (QuantConfig, every command's options) imports no torch
    import torch


class FormatError(ValueError):
    """A packed tensor or spec that does not fit its format."""


class PackedFormat:
    """One stored layout of packed layers. Subclasses set the names and implement the methods below."""

    method: str = ""  # the `quant_method` of checkpoints in this format
    name: str = ""  # the `checkpoint_format`
    marker: str = ""  # the tensor whose presence marks a packed layer: PREFIX.<marker>
    stored: tuple[str, ...] = ()  # every tensor name a packed layer may store (besides its bias)
    universal: bool = False  # read by every loader of its method (AutoGPTQ, vLLM, transformers for GPTQ)
    fold_format: str | None = None  # the format an exact in-place adapter merge writes; None: no such merge

    def check_bits(self, bits: int) -> None:
        """Raise FormatError if this format cannot store `bits`."""

    def spec(self, in_features: int, out_features: int, bits: int, group_size: int) -> Any:
        """Shape facts of one layer (raises FormatError if the shape cannot be stored)."""
        raise NotImplementedError

    def shape_from_headers(self, shapes: Mapping[str, tuple[int, ...]], bits: int) -> tuple[int, int]:
        """(in_features, out_features) of a layer from its stored tensors' shapes."""
        raise NotImplementedError

    def read(self, tensors: Mapping[str, torch.Tensor], spec: Any, where: str = "") -> dict[str, torch.Tensor]:
        """Stored tensors (by name) -> the layer's in-memory buffers, validated against `spec`."""
        raise NotImplementedError

    def write(self, buffers: Mapping[str, torch.Tensor], spec: Any, where: str = "") -> dict[str, torch.Tensor]:
        """A layer's in-memory buffers -> the tensors stored in this format (by name)."""
        raise NotImplementedError

    def layer_prefixes(self, keys: Iterable[str]) -> list[str]:
        """Module names of the packed layers among a checkpoint's tensor keys."""
        suffix = "." + self.marker
        return sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))

    def owns(self, key: str, prefixes: set[str] | frozenset[str]) -> bool:
        """Whether a tensor key is one of a packed layer's stored tensors (its bias is not)."""
        prefix, _, leaf = key.rpartition(".")
        return prefix in prefixes and leaf in self.stored

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method}/{self.name})"
