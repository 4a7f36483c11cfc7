"""gptqlora: fine-tune GPTQ-quantized LLMs with LoRA, then merge, export and chat.

Public API (imported lazily so `import gptqlora` stays light):
    load_quantized(path, device=None, dtype=torch.float16) -> transformers model with QuantLinear layers
    save_quantized(model, out_dir, qcfg=None)
    quantize(model_dir, out_dir, QuantConfig(...), QuantizeOptions(...)) -> the quantization report
    get_peft_model(model, config) -> PeftModel with GPTQ-LoRA adapters
    load_adapter(model, adapter_dir) -> PeftModel
    load_run(run_dir, device=None, dtype=None) -> quantized base + the run's adapter
"""

__version__ = "0.1.0"

from gptqlora.lazy import lazy_exports

_API = {
    "load_quantized": "gptqlora.checkpoint.checkpoint",
    "save_quantized": "gptqlora.checkpoint.checkpoint",
    "QuantConfig": "gptqlora.checkpoint.config",
    "quantize": "gptqlora.quant.api",
    "QuantizeOptions": "gptqlora.quant.options",
    "QuantLinear": "gptqlora.nn.quant_linear",
    "GPTQLoraConfig": "gptqlora.adapters.config",
    "get_peft_model": "gptqlora.adapters.model",
    "load_adapter": "gptqlora.adapters.model",
    "load_run": "gptqlora.run",
    "Run": "gptqlora.run",
}
__getattr__ = lazy_exports(__name__, _API)
__all__ = list(_API)
