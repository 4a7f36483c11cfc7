"""Quantization: the GPTQ/RTN solvers, the block-by-block driver and the one `quantize` entry point.

The names below are imported lazily, so that `gptqlora.quant.options` (the options' help) imports no torch.
"""

from gptqlora.lazy import lazy_exports

_API = {
    "QuantizeOptions": "gptqlora.quant.options",
    "TrainingData": "gptqlora.quant.api",
    "quantize": "gptqlora.quant.api",
}
__getattr__ = lazy_exports(__name__, _API)
__all__ = list(_API)
