"""Training: the arguments of `gptqlora finetune` and the Trainer with what long GPTQ-LoRA runs need."""
