"""Tiny in-process models for tests: random LLaMA weights and a character tokenizer, no downloads."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = list(string.printable)


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def tiny_llama(layers: int = 2, hidden: int = 128, intermediate: int = 256, heads: int = 4, kv_heads: int = 2,
               vocab: int = 128, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_llama(out: Path, **kw) -> Path:
    model = tiny_llama(**kw)
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def calibration_samples(n: int = 8, length: int = 64, vocab: int = 128, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (1, length), generator=g) for _ in range(n)]


def packed_tiny_llama(bits: int = 4, group_size: int = 32, seed: int = 0, **kw) -> LlamaForCausalLM:
    """tiny_llama with its seven projections swapped for QuantLinear layers holding random packed codes."""
    from gptqlora.nn.quant_linear import QuantLinear
    from gptqlora.nn.skeleton import quantize_skeleton

    model = quantize_skeleton(tiny_llama(seed=seed, **kw), bits, group_size, device="cpu")
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.qweight.random_(-2**31, 2**31 - 1, generator=g)
            m.qzeros.random_(-2**31, 2**31 - 1, generator=g)
            m.scales.copy_(torch.rand(m.scales.shape, generator=g) * 0.02)
    return model


def train_steps(peft_model, steps: int = 3, lr: float = 1e-2, vocab: int = 128) -> list[float]:
    """AdamW steps of causal-LM loss on one fixed random batch; the losses."""
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(4, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    out = []
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(float(loss))
    return out
