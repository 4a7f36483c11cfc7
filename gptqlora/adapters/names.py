"""The adapter's option values, without peft or torch: `finetune --help` shows them, and must not wait for
peft. `gptqlora.adapters.config` re-exports them."""

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT_METHODS = ("default", "svd", "aware", "output")
FP_INITS = ("svd", "aware", "output")  # the inits that read the original weights (svd_source)
CALIBRATED_INITS = ("aware", "output")  # the inits that also need calibration samples
LORA_DTYPES = ("float32", "bfloat16")
