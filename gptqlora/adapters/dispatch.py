"""The one place that tells PEFT which LoRA layer wraps which base layer: GPTQLoraLinear wraps every
packed layer class in the format registry.

PEFT does not save this mapping with an adapter, so every gptqlora entry point that wraps or loads
(get_peft_model, load_adapter, load_run) calls `register` on the config it passes to PEFT.
"""

from __future__ import annotations

from peft import LoraConfig

from gptqlora.adapters.layer import GPTQLoraLinear
from gptqlora.nn.registry import FORMATS


def register(config: LoraConfig) -> LoraConfig:
    config._register_custom_module({cls: GPTQLoraLinear for cls in FORMATS.layer_classes()})
    return config
