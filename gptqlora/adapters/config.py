"""GPTQLoraConfig: a PEFT LoraConfig with gptqlora's defaults and quantization-aware options.

It saves as a standard LoRA `adapter_config.json` (peft_type "LORA", only LoraConfig's own keys, so plain
PEFT loads it without a warning); the fields that are ours alone (OWN_FIELDS) go beside it, into
`gptqlora_adapter.json`, which `gptqlora.adapters.model.read_adapter_config` reads back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from peft import LoraConfig

from gptqlora.adapters.names import CALIBRATED_INITS, FP_INITS, INIT_METHODS, LLAMA_TARGETS, LORA_DTYPES  # noqa: F401

OWN_FIELDS = ("lora_dtype", "init_method", "svd_iters", "svd_source")  # not LoraConfig's: kept out of its file
SETTINGS_FILE = "gptqlora_adapter.json"  # beside adapter_config.json: OWN_FIELDS
CONFIG_FILE = "adapter_config.json"


def standard_adapter_config(raw: dict[str, Any]) -> dict[str, Any]:
    """An adapter_config.json's content without our own keys (older gptqlora wrote them into it)."""
    return {k: v for k, v in raw.items() if k not in OWN_FIELDS}


@dataclass
class GPTQLoraConfig(LoraConfig):
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: Optional[list[str] | str] = field(
        default_factory=lambda: list(LLAMA_TARGETS),
        metadata={"help": "module names (suffixes) to wrap; default: all seven LLaMA projections"})
    task_type: Optional[str] = field(default="CAUSAL_LM", metadata={"help": "PEFT task type"})
    lora_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the LoRA weights: float32 or bfloat16 (compute follows autocast on GPU)"})
    init_method: str = field(
        default="default",
        metadata={"help": "'default': B = 0, so training starts from the quantized model. 'svd': A, B from a "
                          "truncated SVD of the quantization residual W_fp - dequant(Q) (LoftQ-style), which "
                          "needs the original weights (`svd_source`); starts closer to the fp16 model. 'aware': the same with the "
                          "residual weighted by the calibration activations (Hessian-whitened SVD), block by "
                          "block; needs `svd_source` and calibration samples. 'output': the same whitened SVD, "
                          "fitted to what each layer outputs in the fp model (inputs from an fp copy of each "
                          "block) rather than to W_fp: with a GPTAQ base it corrects toward the weights the "
                          "codes aimed at; needs `svd_source` (every block tensor) and calibration samples"})
    svd_source: Optional[str] = field(
        default=None, metadata={"help": "directory of the fp16/bf16 model, for init_method 'svd', 'aware' or 'output'"})
    svd_iters: int = field(
        default=1,
        metadata={"help": "alternations for init_method='svd'; more than 1 also re-rounds the base codes on "
                          "their existing grid to fit W_fp - BA (the base then changes and is saved in the run)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_method not in INIT_METHODS:
            raise ValueError(f"init_method must be one of {INIT_METHODS}, got {self.init_method!r}")
        if self.init_method in FP_INITS and not self.svd_source:
            raise ValueError(f"init_method={self.init_method!r} needs svd_source: the directory of the original "
                             f"fp16 model")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {LORA_DTYPES}, got {self.lora_dtype!r}")
        if self.use_dora:
            raise ValueError("DoRA is not supported on GPTQ layers")
        if self.svd_iters < 1:
            raise ValueError("svd_iters must be >= 1")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's adapter_config.json with LoraConfig's keys only, and our own settings beside it."""
        super().save_pretrained(save_directory, **kwargs)
        path = Path(save_directory) / CONFIG_FILE
        raw = json.loads(path.read_text())
        path.write_text(json.dumps(standard_adapter_config(raw), indent=2, sort_keys=True))
        own = {k: getattr(self, k) for k in OWN_FIELDS}
        (Path(save_directory) / SETTINGS_FILE).write_text(json.dumps(own, indent=2, sort_keys=True) + "\n")
