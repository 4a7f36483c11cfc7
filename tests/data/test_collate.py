from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptqlora.data.collate import DataCollator, pack_examples
from gptqlora.data.tokenize import IGNORE_INDEX

EXAMPLES = [
    {"input_ids": [1, 5, 6, 7], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 6, 7]},
    {"input_ids": [1, 8], "attention_mask": [1, 1], "labels": [-100, 8]},
    {"input_ids": [1, 9, 10], "attention_mask": [1, 1, 1], "labels": [1, 9, 10]},
]


def tok(pad=0, eos=2):
    return SimpleNamespace(pad_token_id=pad, eos_token_id=eos)


def test_right_padding():
    batch = DataCollator(tok(pad=0))(EXAMPLES)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 0, 0], [1, 9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, 8, -100, -100], [1, 9, 10, -100]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_pad_to_multiple_and_eos_fallback():
    batch = DataCollator(tok(pad=None, eos=2), pad_to_multiple_of=8)(EXAMPLES)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["input_ids"][1, 2:].tolist() == [2] * 6
    with pytest.raises(ValueError, match="neither a pad_token nor an eos_token"):
        DataCollator(tok(pad=None, eos=None))(EXAMPLES)


def test_mask_built_when_missing():
    feats = [{k: v for k, v in ex.items() if k != "attention_mask"} for ex in EXAMPLES]
    assert DataCollator(tok())(feats)["attention_mask"].sum().item() == 9


def test_pack_examples():
    rows = pack_examples(EXAMPLES * 2, max_len=6)
    assert [len(r["input_ids"]) for r in rows] == [6, 3, 6, 3]
    assert rows[0]["input_ids"] == [1, 5, 6, 7, 1, 8]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 0, 1]
    # labels per example; each example's first label is -100 (nothing of it precedes it)
    assert rows[0]["labels"] == [-100, -100, 6, 7, -100, 8]
    assert rows[1]["labels"] == [-100, 9, 10]
    assert sum(len(r["input_ids"]) for r in rows) == 2 * sum(len(e["input_ids"]) for e in EXAMPLES)
    assert pack_examples([{"input_ids": list(range(10)), "labels": list(range(10))}], 4)[0]["input_ids"] == [0, 1, 2, 3]


def test_packed_batch_pads_positions_and_drops_mask():
    batch = DataCollator(tok())(pack_examples(EXAMPLES, max_len=6))
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 3


def test_packed_row_computes_like_separate_examples(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    exs = [{"input_ids": [1, 20, 21, 22, 23], "labels": [1, 20, 21, 22, 23]},
           {"input_ids": [1, 30, 31], "labels": [1, 30, 31]}]
    packed = DataCollator(tok(pad=3))(pack_examples(exs, max_len=16))
    with torch.no_grad():
        logits = model(**packed, use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in exs]
    torch.testing.assert_close(logits[:5], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[5:8], alone[1], atol=1e-4, rtol=1e-4)
