"""GPTQLoraConfig: a PEFT LoraConfig with gptqlora's defaults and quantization-aware options.

It saves as a standard LoRA `adapter_config.json` (peft_type "LORA"); the fields below that are ours alone
are extra keys that plain PEFT ignores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft import LoraConfig

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT_METHODS = ("default", "svd", "aware")
LORA_DTYPES = ("float32", "bfloat16")


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
                          "block; needs `svd_source` and calibration samples"})
    svd_source: Optional[str] = field(
        default=None, metadata={"help": "directory of the fp16/bf16 model, for init_method='svd' or 'aware'"})
    svd_iters: int = field(
        default=1,
        metadata={"help": "alternations for init_method='svd'; more than 1 also re-rounds the base codes on "
                          "their existing grid to fit W_fp - BA (the base then changes and is saved in the run)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_method not in INIT_METHODS:
            raise ValueError(f"init_method must be one of {INIT_METHODS}, got {self.init_method!r}")
        if self.init_method in ("svd", "aware") and not self.svd_source:
            raise ValueError(f"init_method={self.init_method!r} needs svd_source: the directory of the original "
                             f"fp16 model")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {LORA_DTYPES}, got {self.lora_dtype!r}")
        if self.use_dora:
            raise ValueError("DoRA is not supported on GPTQ layers")
        if self.svd_iters < 1:
            raise ValueError("svd_iters must be >= 1")
