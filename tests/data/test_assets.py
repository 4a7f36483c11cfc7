import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptqlora.data.assets import tiny_model_dir
from gptqlora.data.templates import PromptTemplate
from gptqlora.data.tokenize import encode_prompt


def test_tiny_model_files():
    d = tiny_model_dir()
    assert (d / "model.safetensors").is_file() and (d / "README.md").is_file()
    assert sum(f.stat().st_size for f in d.iterdir()) < 16 * 2**20
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    for dim in (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                cfg["num_attention_heads"] * cfg["head_dim"]):
        assert dim % 64 == 0  # every linear layer's in/out features


def test_tokenizer_loads_offline_and_round_trips(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for text in ["Reverse the word 'abc'.", "tabs\tand\nnewlines  ", "ünïcödé ✓ 😀", "What is 37 + 48 - 19?"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in tok("ünïcödé")["input_ids"]  # byte fallback, not <unk>
    prompt = PromptTemplate.load("alpaca").prompt({"instruction": "Reverse the word.", "input": "abc"})
    assert len(encode_prompt(tok, prompt)) < 30  # template boilerplate is a few tokens


def test_chat_template(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == "<s><|user|>\nhi\n<|assistant|>\nyo</s>"
    assert tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>\n"
    )


def test_tiny_model_loads_and_generates(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True, dtype=torch.float32).eval()
    assert model.config.architectures == ["LlamaForCausalLM"]
    rec = {"instruction": "Reverse the word.", "input": "abcd"}
    ids = torch.tensor([encode_prompt(tokenizer, PromptTemplate.load("alpaca").prompt(rec))])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert isinstance(text, str)
