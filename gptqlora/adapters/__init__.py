"""The GPTQ-LoRA adapter type: PEFT LoRA layers on frozen QuantLinear bases.

The names below are imported lazily, so that `gptqlora.adapters.names` (the options' help) imports no peft.
"""

_API = {
    "GPTQLoraConfig": "gptqlora.adapters.config",
    "GPTQLoraLinear": "gptqlora.adapters.layer",
    "AdapterError": "gptqlora.adapters.model",
    "get_peft_model": "gptqlora.adapters.model",
    "load_adapter": "gptqlora.adapters.model",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gptqlora.adapters' has no attribute {name!r}")


__all__ = list(_API)
