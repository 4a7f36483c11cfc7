"""The GPTQ-LoRA adapter type: PEFT LoRA layers on frozen QuantLinear bases.

The names below are imported lazily, so that `gptqlora.adapters.names` (the options' help) imports no peft.
"""

from gptqlora.lazy import lazy_exports

_API = {
    "GPTQLoraConfig": "gptqlora.adapters.config",
    "GPTQLoraLinear": "gptqlora.adapters.layer",
    "AdapterError": "gptqlora.adapters.model",
    "get_peft_model": "gptqlora.adapters.model",
    "load_adapter": "gptqlora.adapters.model",
}
__getattr__ = lazy_exports(__name__, _API)
__all__ = list(_API)
