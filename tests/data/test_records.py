import json

import pytest

from gptqlora.data.records import DataError, read_records


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_alpaca_jsonl(write):
    recs = {"instruction": "i", "input": "x", "output": "o"}, {"instruction": "i2", "output": "o2"}
    path = write("a.jsonl", jsonl(*recs))
    rf = read_records(path)
    assert rf.kind == "alpaca" and len(rf) == 2
    assert rf.locations == [f"{path}:1", f"{path}:2"]


def test_cot_json_array_and_extra_fields(write):
    recs = [{"question": "q", "rationale": "r", "answer": "a", "task": "arith"}] * 3
    rf = read_records(write("c.json", json.dumps(recs)))
    assert rf.kind == "cot" and rf.records[0]["task"] == "arith"
    assert rf.locations[2].endswith("[record 2]")


def test_chat_records(write):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert read_records(write("m.jsonl", jsonl(rec))).kind == "chat"
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match=r"m2.jsonl:1: no 'assistant'"):
        read_records(write("m2.jsonl", jsonl(bad)))
    with pytest.raises(DataError, match=r"messages\[0\]"):
        read_records(write("m3.jsonl", jsonl({"messages": [{"role": "user"}]})))


def test_missing_field_names_file_and_line(write):
    path = write("a.jsonl", jsonl({"instruction": "i", "output": "o"}, {"instruction": "i"}))
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'output'"):
        read_records(path)


def test_missing_field_in_json_array_names_index(write):
    recs = [{"question": "q", "rationale": "r", "answer": "a"}, {"question": "q", "answer": "a"}]
    path = write("c.json", json.dumps(recs))
    with pytest.raises(DataError, match=r"\[record 1\]: missing field 'rationale'"):
        read_records(path)


@pytest.mark.parametrize("text", ["", "  \n\n", "[]"])
def test_empty_file(write, text):
    with pytest.raises(DataError, match="empty"):
        read_records(write("e.jsonl", text))


def test_broken_json_line_number_counts_blank_lines(write):
    text = jsonl({"instruction": "i", "output": "o"}) + "\n" + '{"instruction": "i", "output": \n'
    path = write("b.jsonl", text)
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        read_records(path)


def test_broken_json_array(write):
    with pytest.raises(DataError, match=r"b.json:2: invalid JSON"):
        read_records(write("b.json", '[{"instruction": "i", "output": "o"},\n {"instruction": }]'))


def test_wrong_type(write):
    path = write("t.jsonl", jsonl({"question": "q", "rationale": "r", "answer": 5}))
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'answer' must be a string, got int"):
        read_records(path)
    with pytest.raises(DataError, match="field 'input' must be a string"):
        read_records(write("t2.jsonl", jsonl({"instruction": "i", "input": ["x"], "output": "o"})))


def test_not_an_object_and_unknown_kind(write):
    with pytest.raises(DataError, match="cannot tell the record kind"):
        read_records(write("u.jsonl", jsonl({"text": "hello"})))
    with pytest.raises(DataError, match=r"x.jsonl:2: expected a JSON object"):
        read_records(write("x.jsonl", jsonl({"instruction": "i", "output": "o"}, [1, 2])))


def test_mixed_kinds_in_one_file(write):
    recs = {"instruction": "i", "output": "o"}, {"question": "q", "rationale": "r", "answer": "a"}
    path = write("m.jsonl", jsonl(*recs))
    with pytest.raises(DataError, match=r"m.jsonl:2: looks like a cot record"):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
