"""Frozen packed base layers."""

from gptqlora.nn.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
