"""Storage: safetensors I/O, `quantization_config`, loading and saving packed checkpoints.

Loading a model imports this room, the layers and the formats; never the quantization solvers. The names
below are imported lazily, so that reading a QuantConfig (every command's options) does not import
transformers' model loading.
"""

from gptqlora.lazy import lazy_exports

_API = {
    "load_quantized": "gptqlora.checkpoint.checkpoint",
    "save_quantized": "gptqlora.checkpoint.checkpoint",
    "QuantConfig": "gptqlora.checkpoint.config",
    "QuantConfigError": "gptqlora.checkpoint.config",
    "read_quant_config": "gptqlora.checkpoint.config",
    "CheckpointError": "gptqlora.checkpoint.io",
}
__getattr__ = lazy_exports(__name__, _API)
__all__ = list(_API)
