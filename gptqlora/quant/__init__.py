"""Quantization: the GPTQ/RTN solvers, the block-by-block driver and the one `quantize` entry point."""

from gptqlora.quant.api import QuantizeOptions, TrainingData, quantize

__all__ = ["QuantizeOptions", "TrainingData", "quantize"]
