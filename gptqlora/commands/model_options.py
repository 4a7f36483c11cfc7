"""The options `chat` and `generate` share: which model, how prompts are rendered, how to sample."""

from __future__ import annotations

import argparse

from gptqlora.commands.args import add_option, ranged


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help="the run folder written by `gptqlora finetune`")
    add_option(p, "base", help="a quantized checkpoint to use instead of a run folder")
    add_option(p, "adapter", dest="adapters", action="append", default=[], metavar="[NAME=]PATH",
               help="load a LoRA adapter (a PEFT folder or a run folder); repeat for several; the first "
                    "loaded (the run's own, with RUN_DIR) is active")
    add_option(p, "template", help="prompt template name or JSON file (default: the run's; alpaca with --base)")
    add_option(p, "chat_template", action="store_true",
               help="render with the tokenizer's chat template (the default when the run trained on chat data)")
    add_option(p, "system", help="system message (chat template) or a paragraph put before the prompt")
    add_option(p, "max_new_tokens", type=ranged(int, "max_new_tokens", min=1), default=256,
               help="most tokens per reply (default 256)")
    add_option(p, "temperature", type=ranged(float, "temperature", min=0), default=0.0,
               help="sampling temperature; 0 = greedy (default)")
    add_option(p, "top_p", type=ranged(float, "top_p", gt=0, max=1), default=1.0,
               help="nucleus sampling threshold, in (0, 1] (default 1.0)")
    add_option(p, "max_context", type=ranged(int, "max_context", min=2), default=None,
               help="tokens of prompt + reply (default: the model's max_position_embeddings)")
    add_option(p, "decode", choices=("auto", "compiled", "eager"), default="auto",
               help="compiled: a static KV cache and the decode step compiled with CUDA graphs (torch.compile; "
                    "the first reply waits while it compiles, later ones run without per-token launch "
                    "overhead); eager: transformers' dynamic cache; auto (default): compiled on CUDA, eager "
                    "elsewhere")
    add_option(p, "device", default=None, help="device (default: cuda if available, else cpu)")
    add_option(p, "seed", type=int, default=None, help="random seed, for reproducible sampling")


def sampling(args: argparse.Namespace):
    from gptqlora.inference import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.decode)


def set_seed(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed as hf_set_seed

        hf_set_seed(seed)
