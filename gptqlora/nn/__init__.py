"""Frozen packed base layers (QuantLinear) and the registry binding each stored format to its layer."""

from gptqlora.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
