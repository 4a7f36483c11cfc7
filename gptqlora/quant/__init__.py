"""Quantization: the GPTQ/RTN solvers, the block-by-block driver and the one `quantize` entry point.

The names below are imported lazily, so that `gptqlora.quant.options` (the options' help) imports no torch.
"""

_API = {
    "QuantizeOptions": "gptqlora.quant.options",
    "TrainingData": "gptqlora.quant.api",
    "quantize": "gptqlora.quant.api",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gptqlora.quant' has no attribute {name!r}")


__all__ = list(_API)
