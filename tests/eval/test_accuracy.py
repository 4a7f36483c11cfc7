from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptqlora.data.assets import eval_data_files, tiny_model_dir
from gptqlora.data.records import read_records
from gptqlora.data.templates import PromptTemplate
from gptqlora.eval.accuracy import task_accuracy


@pytest.fixture(scope="module")
def model_and_tokenizer():
    d: Path = tiny_model_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def records():
    alpaca, cot = (read_records(p).records for p in eval_data_files())
    return alpaca[:24] + cot[:24]


def test_bundled_model_is_accurate(model_and_tokenizer, records):
    model, tok = model_and_tokenizer
    templates = {"alpaca": PromptTemplate.load("alpaca"), "cot": PromptTemplate.load("cot")}
    res = task_accuracy(model, tok, records, lambda r: templates["cot" if "question" in r else "alpaca"],
                        max_new_tokens=48, batch_size=48)
    assert res["total"] == 48 and len(res["responses"]) == 48
    assert res["correct"] == sum(t["correct"] for t in res["per_task"].values())
    assert "arith" in res["per_task"]
    assert res["accuracy"] >= 0.7, res["per_task"]  # 0.83 on this subset when the model was made


def test_custom_scorer_single_template_and_chat(model_and_tokenizer):
    model, tok = model_and_tokenizer
    model.train()
    recs = [{"instruction": "Give the first letter of the word.", "input": "kqz", "output": "k"},
            {"messages": [{"role": "user", "content": "Reverse the word.\n\nabc"},
                          {"role": "assistant", "content": "cba"}]}]
    seen = []
    res = task_accuracy(model, tok, recs, PromptTemplate.load("alpaca_short"), max_new_tokens=8,
                        scorer=lambda r, text: seen.append(text) or True)
    assert res["accuracy"] == 1.0 and seen == res["responses"]
    assert res["per_task"] == {"all": {"accuracy": 1.0, "correct": 2, "total": 2}}
    assert model.training  # restored
    model.eval()
