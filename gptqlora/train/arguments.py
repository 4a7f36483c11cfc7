"""`gptqlora finetune` arguments, grouped as dataclasses; `--help` is built from their help texts.

The quantization arguments (`QuantConfig`, `QuantizeOptions`) are shared with `quantize` and `merge`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from gptqlora.adapters.names import INIT_METHODS, LLAMA_TARGETS
from gptqlora.data.templates import DEFAULT_TEMPLATE, available_templates


@dataclass
class ModelArguments:
    """Which base model to train on."""

    quant_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "a GPTQ checkpoint directory (ours, AutoGPTQ, GPTQModel or the Hub's layout)"})
    base_model: Optional[str] = field(default=None, metadata={
        "help": "the fp16/bf16 model directory: quantized first (into RUN/base, with the quantization and "
                "calibration arguments below) when no --quant_checkpoint is given; with one, used for the SVD "
                "init. Neither given: the bundled tiny model (the built-in demo)"})


@dataclass
class DataArguments:
    """Training data and how it is rendered."""

    data: list[str] = field(default_factory=list, metadata={
        "help": "JSON/JSONL files (comma-separated): Alpaca (instruction/input/output), CoT "
                "(question/rationale/answer) or chat (messages) records. Default: the bundled synthetic sets"})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={
        "help": f"prompt template: {', '.join(available_templates())} (bundled), or a path to a template JSON file"})
    cutoff_len: int = field(default=256, metadata={
        "min": 8, "help": "longest example in tokens (longer ones are cut)"})
    val_set_size: float = field(default=0, metadata={"min": 0,
        "help": "validation records held out: a count (>= 1) or a fraction (< 1); 0 = none"})
    train_on_inputs: bool = field(default=False, metadata={
        "help": "also train on the prompt tokens (default: only the response is learned)"})
    packing: bool = field(default=False, metadata={"help": "pack several examples into each row"})


@dataclass
class LoraArguments:
    """The GPTQ-LoRA adapter."""

    lora_r: int = field(default=8, metadata={"min": 1, "help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"gt": 0, "help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"min": 0, "lt": 1, "help": "dropout on the LoRA input"})
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS), metadata={
        "help": "modules to adapt, e.g. \"['q_proj','v_proj']\" or q_proj,v_proj"})
    adapter_name: str = field(default="gptqlora", metadata={
        "help": "adapter type; 'gptqlora' (also accepted: 'lora') trains LoRA on the quantized base"})
    lora_dtype: str = field(default="float32", metadata={
        "help": "dtype of the LoRA weights", "choices": ("float32", "bfloat16")})
    init_method: str = field(default="auto", metadata={
        "help": "auto (svd for a base of <= 3 bits when --base_model gives the fp weights, else B=0: SVD "
                "closed the most of the 2-bit gap in docs/results.md); default (B=0); svd (A, B from the SVD of the quantization residual); aware (the residual "
                "weighted by the calibration activations, block by block: the closest start at 2 bit, but it "
                "trained worse than B=0 in docs/results.md, so it is not the default); output (the same, fitted to "
                "the fp model's layer outputs: corrects toward what GPTAQ's codes aim at; the closest start "
                "with a GPTAQ base, but SVD still trained best in docs/results.md). svd, aware and output need "
                "--base_model",
        "choices": ("auto", *INIT_METHODS)})
    svd_iters: int = field(default=1, metadata={"min": 1, "help": "alternations for --init_method svd"})
    use_qalora: bool = field(default=False, metadata={
        "help": "QA-LoRA: pool the input per quantization group, so the adapter merges exactly into the zeros"})
    qalora_group_size: int = field(default=0, metadata={"min": 0,
        "help": "QA-LoRA pooling group (default 0: the base's quantization group size)"})


@dataclass
class TrainArguments:
    """The training run."""

    output_dir: Optional[str] = field(default=None, metadata={
        "help": "the run folder (adapter, arguments, template, logs, checkpoints); default runs/<time>"})
    batch_size: int = field(default=16, metadata={
        "min": 1, "help": "global batch size (gradients accumulate to it)"})
    micro_batch_size: int = field(default=4, metadata={"min": 1, "help": "examples per device per forward pass"})
    num_epochs: float = field(default=3, metadata={"gt": 0, "help": "epochs over the training data"})
    max_steps: int = field(default=-1, metadata={
        "min": 1, "also": (-1,), "help": "stop after this many optimizer steps (-1: epochs)"})
    learning_rate: float = field(default=3e-4, metadata={"gt": 0, "help": "peak learning rate"})
    lr_scheduler: str = field(default="cosine", metadata={
        "help": "learning-rate schedule", "choices": ("cosine", "linear", "constant")})
    warmup_steps: int = field(default=10, metadata={"min": 0, "help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"min": 0, "help": "AdamW weight decay"})
    optim: str = field(default="adamw_torch", metadata={
        "help": "optimizer: adamw_torch, or paged_adamw_8bit (bitsandbytes: 8-bit moments, 2 instead of 8 bytes "
                "per trainable parameter, paged to host memory under pressure; on a CPU, not paged)",
        "choices": ("adamw_torch", "paged_adamw_8bit")})
    use_gradient_checkpointing: bool = field(default=False, metadata={
        "help": "the research scripts' flag: --gradient_checkpointing full (an explicit --gradient_checkpointing "
                "wins)"})
    gradient_checkpointing: str = field(default="auto", metadata={
        "help": "recompute decoder blocks in backward: full (least memory, ~30% slower), selective "
                "(--checkpoint_fraction of the blocks), none (fastest), auto (on a GPU: as few blocks as fit "
                "the free memory, measured on the model; on a CPU: none)",
        "choices": ("auto", "full", "selective", "none")})
    checkpoint_fraction: float = field(default=0.5, metadata={
        "help": "--gradient_checkpointing selective: the fraction of decoder blocks recomputed"})
    offload_activations: bool = field(default=False, metadata={
        "help": "keep the checkpointed blocks' inputs in pinned host memory (frees layers x tokens x hidden "
                "x 2 bytes on the GPU, 2.5 GiB for 65B at 2048 tokens; costs a copy back per block in backward)"})
    loss: str = field(default="auto", metadata={
        "help": "how the loss over the vocabulary is computed: chunked (1024 tokens of logits at a time, one "
                "more lm_head matmul in backward, <1% slower), full (transformers': all fp32 logits at once), "
                "auto (Liger's fused linear+cross-entropy where --liger applies it, else chunked)",
        "choices": ("auto", "chunked", "full")})
    expandable_segments: bool = field(default=True, metadata={
        "help": "CUDA allocator with expandable segments (less fragmentation; PYTORCH_CUDA_ALLOC_CONF, when "
                "set, wins)"})
    liger: str = field(default="auto", metadata={
        "help": "Liger-Kernel's fused RMSNorm/SwiGLU/RoPE/linear+cross-entropy: auto (on for CUDA when "
                "liger-kernel is installed), on, off", "choices": ("auto", "on", "off")})
    compile: str = field(default="auto", metadata={
        "help": "torch.compile: blocks (each decoder block compiled by inductor: the per-block host work and "
                "the small elementwise kernels fused away, 1.35x faster on a 7B; the first steps take half a "
                "minute or more to compile; Liger then fuses only the loss), none, auto (blocks on CUDA "
                "unless --offload_activations, else none)", "choices": ("auto", "none", "blocks")})
    reentrant_checkpointing: bool = field(default=False, metadata={
        "help": "use reentrant activation checkpointing (default: non-reentrant)"})
    precision: str = field(default="auto", metadata={
        "help": "compute precision: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU)",
        "choices": ("auto", "bf16", "fp16", "fp32")})
    logging_steps: int = field(default=10, metadata={"min": 1, "help": "log the loss every N steps"})
    eval_steps: int = field(default=200, metadata={"min": 1, "help": "evaluate on the validation set every N steps"})
    save_steps: int = field(default=200, metadata={"min": 1, "help": "write a checkpoint every N steps"})
    save_total_limit: int = field(default=3, metadata={"min": 1, "help": "keep the last K checkpoints"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "'true' to resume from the run folder's last complete checkpoint, or a checkpoint path"})
    report_to: str = field(default="none", metadata={
        "help": "none, wandb (works with WANDB_MODE=offline) or tensorboard"})
    run_name: Optional[str] = field(default=None, metadata={"help": "name for wandb/tensorboard"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    eval_accuracy: Optional[bool] = field(default=None, metadata={
        "help": "measure task accuracy before and after training on the bundled synthetic eval sets "
                "(default: on for the built-in demo)"})
    eval_limit: int = field(default=100, metadata={"min": 1, "help": "eval records per set for --eval_accuracy"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run folder"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    dry_run: bool = field(default=False, metadata={
        "help": "resolve and print the arguments (and the Trainer's settings) as JSON, then stop"})


ALIASES = {  # the research scripts' spellings
    "data": ["data_path"],
    "eval_steps": ["eval_step"],
    "save_steps": ["save_step"],
    "report_to": [],
    "run_name": ["wandb_run_name"],
}
