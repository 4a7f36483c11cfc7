"""Storage: safetensors I/O, `quantization_config`, loading and saving packed checkpoints.

Loading a model imports this room, the layers and the formats; never the quantization solvers.
"""

from gptqlora.checkpoint.checkpoint import load_quantized, save_quantized
from gptqlora.checkpoint.config import QuantConfig, QuantConfigError, read_quant_config
from gptqlora.checkpoint.io import CheckpointError

__all__ = ["load_quantized", "save_quantized", "QuantConfig", "QuantConfigError", "read_quant_config",
           "CheckpointError"]
