"""The GPTQ-LoRA adapter type: PEFT LoRA layers on frozen QuantLinear bases."""

from gptqlora.adapters.config import GPTQLoraConfig
from gptqlora.adapters.layer import GPTQLoraLinear
from gptqlora.adapters.model import AdapterError, get_peft_model, load_adapter

__all__ = ["GPTQLoraConfig", "GPTQLoraLinear", "AdapterError", "get_peft_model", "load_adapter"]
