"""A calibration file's training records are read as finetune's data reader reads them (data/records.py) and
rendered as training renders them (the prompt templates), so that quantize calibrates on the text the model
will be fine-tuned on; 'text' and 'input_ids' records and .txt files stay as they were."""

import json

import pytest

from gptqlora.data.calibration import CalibrationError, calibration_from_data, read_calibration_records
from gptqlora.data.records import DataError, read_records
from gptqlora.data.templates import PromptTemplate

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          {"instruction": "Reverse the word.", "input": "cat", "output": "tac"}]
COT = [{"question": "What is 2 + 3?", "rationale": "2 plus 3 is 5.", "answer": "5"}]
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def rendered(name: str, records) -> list[str]:
    tpl = PromptTemplate.load(name)
    return [tpl.prompt(r) + tpl.response(r) for r in records]


def test_alpaca_records_render_as_the_template_does(write):
    path = write("a.jsonl", jsonl(*ALPACA))
    texts, ids = read_calibration_records(path)
    assert ids == [] and texts == rendered("alpaca", ALPACA)  # finetune's default template
    assert "### Input:\ncat" in texts[1] and "### Input:" not in texts[0]
    short = PromptTemplate.load("alpaca_short")
    assert read_calibration_records(path, short)[0] == rendered("alpaca_short", ALPACA)
    # a template of another kind is not forced on them: the bundled one of their kind renders them, as in training
    assert read_calibration_records(path, PromptTemplate.load("cot"))[0] == rendered("alpaca", ALPACA)


def test_cot_records_render_as_the_template_does(write):
    path = write("c.json", json.dumps(COT * 2))
    texts, _ = read_calibration_records(path, PromptTemplate.load("alpaca"))
    assert texts == rendered("cot", COT * 2)
    assert texts[0].endswith("### Answer:\n2 plus 3 is 5.\nThe answer is 5.")


def test_the_same_text_as_calibrating_on_the_training_files(write, tokenizer):
    """--calibration FILE and calibrating on FILE as training data render the same text (chat included)."""
    tpl = PromptTemplate.load("alpaca_short")
    for i, record in enumerate(ALPACA + COT + CHAT):  # one record a file: calibration_from_data shuffles records
        path = write(f"{i}.jsonl", jsonl(record))
        (text,), _ = read_calibration_records(path, tpl, tokenizer)
        want = calibration_from_data([path], tokenizer, tpl, nsamples=1, seqlen=10_000)[0][0].tolist()
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == want, record


def test_a_record_of_no_known_kind_is_one_line_naming_file_and_line(write):
    path = write("x.jsonl", jsonl({"text": "fine"}, {"prompt": "p", "completion": "c"}))
    with pytest.raises(CalibrationError) as e:
        read_calibration_records(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:2: cannot tell the record kind from fields "
                                              f"['completion', 'prompt']; Alpaca records need")
    assert "'text'" in msg and "'input_ids'" in msg  # what else a calibration file takes


@pytest.mark.parametrize("body", [jsonl(ALPACA[0], {"instruction": "no output"}),
                                  jsonl(ALPACA[0], {"instruction": "i", "output": 5}),
                                  jsonl(COT[0], {"question": "q", "answer": "a"}),
                                  jsonl({"messages": [{"role": "user", "content": "no answer"}]})])
def test_a_broken_record_gets_the_data_readers_line(write, body):
    path = write("bad.jsonl", body)
    with pytest.raises(DataError) as want:
        read_records(path)
    with pytest.raises(CalibrationError) as got:
        read_calibration_records(path)
    assert str(got.value) == str(want.value) and str(got.value).startswith(f"{path}:")


def test_one_kind_of_training_record_per_file_as_the_data_reader(write):
    path = write("m.jsonl", jsonl(ALPACA[0], COT[0]))
    with pytest.raises(DataError, match="looks like a cot record"):
        read_records(path)  # finetune refuses it ...
    with pytest.raises(CalibrationError, match=rf"{path}:2: looks like a cot record but the file holds alpaca "
                                               rf"records \(from {path}:1\)"):
        read_calibration_records(path)  # ... and so does quantize, in the same words


def test_text_and_token_records_go_with_training_records(write):
    """Calibration's own records are no training kind: a file may add them to its training records, as before."""
    path = write("mix.jsonl", jsonl({"text": "plain text"}, COT[0], {"input_ids": [5, 6, 7]}, {"text": "  "}))
    assert read_calibration_records(path) == (["plain text", *rendered("cot", COT)], [[5, 6, 7]])
    with pytest.raises(CalibrationError, match=r"t.jsonl:1: field 'text' must be a string, got int"):
        read_calibration_records(write("t.jsonl", jsonl({"text": 5})))


def test_quantize_inside_a_run_renders_the_file_with_the_runs_template(write, tokenizer):
    """finetune --base_model / merge --to gptq with --calibration FILE: the run's template renders FILE."""
    from gptqlora.quant.api import QuantizeOptions, TrainingData, calibration_samples

    path = write("a.jsonl", jsonl(ALPACA[0]))
    short = PromptTemplate.load("alpaca_short")
    options = QuantizeOptions(calibration=str(path), nsamples=1, seqlen=10_000)
    (sample,) = calibration_samples(options, tokenizer, TrainingData([], short))
    (default,) = calibration_samples(options, tokenizer)  # quantize on its own: finetune's default template
    for got, name in ((sample, "alpaca_short"), (default, "alpaca")):
        assert got[0].tolist() == tokenizer(rendered(name, ALPACA[:1])[0], add_special_tokens=False)["input_ids"]
