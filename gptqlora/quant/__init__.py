"""Quantization: GPTQ/RTN solvers, the layer-by-layer driver, checkpoint I/O."""

from gptqlora.quant.checkpoint import load_quantized, save_quantized
from gptqlora.quant.config import QuantConfig, read_quant_config
from gptqlora.quant.io import CheckpointError

__all__ = ["load_quantized", "save_quantized", "QuantConfig", "read_quant_config", "CheckpointError"]
