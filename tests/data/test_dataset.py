import json

import pytest

from gptqlora.data.dataset import build_datasets, template_for_kind, templates_for
from gptqlora.data.records import DataError, read_records
from gptqlora.data.synthetic import arithmetic_records, string_records
from gptqlora.data.templates import PromptTemplate
from gptqlora.data.tokenize import IGNORE_INDEX


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def files(write):
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    return [
        write("alpaca.jsonl", jsonl(string_records(12, seed=1))),
        write("cot.json", json.dumps(arithmetic_records(8, seed=2))),
        write("chat.jsonl", jsonl(chat)),
    ]


def test_template_choice_per_kind():
    short, cot = PromptTemplate.load("alpaca_short"), PromptTemplate.load("cot")
    assert template_for_kind("alpaca", short) is short
    assert template_for_kind("cot", short).name == "cot"
    assert template_for_kind("alpaca", cot).name == "alpaca"
    assert template_for_kind("chat", short) is None


def test_build_mixed(files, tokenizer, tmp_path):
    template = PromptTemplate.load("alpaca_short")
    train, val = build_datasets(files, tokenizer, template, cutoff_len=128, cache_dir=str(tmp_path / "c"))
    assert val is None and len(train) == 23
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels"}
    texts = [tokenizer.decode(r["input_ids"]) for r in train]
    assert sum("### Question:" in t for t in texts) == 8  # CoT records rendered with `cot`
    assert sum(t.startswith("<s>### Instruction:") for t in texts) == 12  # Alpaca with the given template
    assert sum("<|assistant|>" in t for t in texts) == 3
    for row in train:
        assert row["labels"][0] == IGNORE_INDEX and row["labels"][-1] == tokenizer.eos_token_id
    used = templates_for([read_records(f) for f in files], template)
    assert {k: t.name for k, t in used.items()} == {"alpaca": "alpaca_short", "cot": "cot"}


def test_val_split_is_deterministic(files, tokenizer, tmp_path):
    template = PromptTemplate.load("alpaca")
    kw = dict(cutoff_len=128, val_set_size=5, seed=3, cache_dir=str(tmp_path / "c"))
    train, val = build_datasets(files, tokenizer, template, **kw)
    assert (len(train), len(val)) == (18, 5)
    train2, val2 = build_datasets(files, tokenizer, template, **kw)
    assert val["input_ids"] == val2["input_ids"]
    _, val3 = build_datasets(files, tokenizer, template, **{**kw, "val_set_size": 0.2})
    assert len(val3) == 5
    with pytest.raises(DataError, match="leaves no training records"):
        build_datasets(files, tokenizer, template, **{**kw, "val_set_size": 23})


def test_packing(files, tokenizer, tmp_path):
    train, _ = build_datasets(files, tokenizer, PromptTemplate.load("alpaca"), cutoff_len=128,
                              packing=True, cache_dir=str(tmp_path / "c"))
    assert set(train.column_names) == {"input_ids", "labels", "position_ids"}
    assert len(train) < 23 and all(len(r["input_ids"]) <= 128 for r in train)


def test_all_files_validated_before_tokenizing(files, write, tokenizer, tmp_path):
    bad = write("bad.jsonl", jsonl([{"instruction": "i", "output": "o"}]) + "{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        build_datasets([*files, bad], tokenizer, PromptTemplate.load("alpaca"), cache_dir=str(tmp_path / "c"))


def test_too_long_prompt_names_the_line(write, tokenizer, tmp_path):
    recs = [{"instruction": "short", "output": "o"}, {"instruction": "x" * 300, "output": "o"}]
    path = write("long.jsonl", jsonl(recs))
    with pytest.raises(DataError, match=rf"{path}:2: the prompt is"):
        build_datasets([path], tokenizer, PromptTemplate.load("alpaca"), cutoff_len=64, cache_dir=str(tmp_path / "c"))


def test_blank_lines_and_optional_input(write, tokenizer, tmp_path):
    text = '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d", "output": "e"}\n\n'
    train, _ = build_datasets([write("blank.jsonl", text)], tokenizer, PromptTemplate.load("alpaca"),
                              cache_dir=str(tmp_path / "c"))
    assert len(train) == 2
