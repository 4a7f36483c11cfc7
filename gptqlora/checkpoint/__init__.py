"""Storage: safetensors I/O, `quantization_config`, loading and saving packed checkpoints.

Loading a model imports this room, the layers and the formats; never the quantization solvers. The names
below are imported lazily, so that reading a QuantConfig (every command's options) does not import
transformers' model loading.
"""

_API = {
    "load_quantized": "gptqlora.checkpoint.checkpoint",
    "save_quantized": "gptqlora.checkpoint.checkpoint",
    "QuantConfig": "gptqlora.checkpoint.config",
    "QuantConfigError": "gptqlora.checkpoint.config",
    "read_quant_config": "gptqlora.checkpoint.config",
    "CheckpointError": "gptqlora.checkpoint.io",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gptqlora.checkpoint' has no attribute {name!r}")


__all__ = list(_API)
