import json

import pytest

from gptqlora.data.templates import PromptTemplate, TemplateError, available_templates

ALPACA = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}
COT = {"question": "What is 2 + 3?", "rationale": "2 + 3 = 5.", "answer": "5"}


def test_bundled_templates_load():
    assert {"alpaca", "alpaca_short", "cot"} <= set(available_templates())
    for name in available_templates():
        t = PromptTemplate.load(name)
        assert t.name == name and t.response_split in t.prompt_no_input


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="alpaca_short"):
        PromptTemplate.load("nope")


def test_alpaca_prompt_with_and_without_input():
    t = PromptTemplate.load("alpaca")
    with_input = t.prompt(ALPACA)
    assert "### Input:\nabc\n\n### Response:\n" in with_input and with_input.endswith("### Response:\n")
    no_input = t.prompt({**ALPACA, "input": ""})
    assert "### Input" not in no_input and "Reverse the word." in no_input
    assert t.prompt({"instruction": "x", "output": "y"}) == t.prompt({"instruction": "x", "input": None, "output": "y"})
    assert t.response(ALPACA) == "cba"


def test_cot_convention():
    t = PromptTemplate.load("cot")
    assert t.kind == "cot"
    assert t.prompt(COT).endswith("### Question:\nWhat is 2 + 3?\n\n### Answer:\n")
    assert t.response(COT) == "2 + 3 = 5.\nThe answer is 5."
    assert t.extract_answer(t.response(COT)) == "5"
    assert t.extract_answer("1.5 + 2 = 3.5.\nThe answer is 3.5.") == "3.5"
    assert t.extract_answer("no final line") == "no final line"


def test_split_response():
    t = PromptTemplate.load("alpaca")
    assert t.split_response(t.prompt(ALPACA) + "cba") == "cba"
    assert t.split_response(" cba \n") == "cba"  # no marker: the text itself


def test_missing_field_is_named():
    with pytest.raises(KeyError, match="instruction"):
        PromptTemplate.load("alpaca").prompt({"output": "x"})


def test_to_dict_round_trip_and_load_from_path(tmp_path):
    for name in available_templates():
        t = PromptTemplate.load(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(t.to_dict()))
        assert PromptTemplate.load(path) == t
        assert PromptTemplate.load(str(path)) == t


def test_custom_template_defaults(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"prompt_input": "{instruction}|{input}>", "prompt_no_input": "{instruction}>",
                                "response_split": ">"}))
    t = PromptTemplate.load(path)
    assert (t.name, t.kind, t.response(ALPACA)) == ("mine", "alpaca", "cba")
    assert t.required_fields() == {"instruction", "output"}
    with pytest.raises(ValueError, match="lacks required keys"):
        PromptTemplate.from_dict({"prompt_input": ""})
    with pytest.raises(TemplateError):
        PromptTemplate.load(tmp_path / "missing.json")


def test_help_texts_name_every_bundled_template():
    """finetune's --template help and the calibration readers' name what is bundled (they are built from it)."""
    import dataclasses

    from gptqlora.data.templates import available_templates
    from gptqlora.quant.options import CALIBRATION_TEMPLATE_HELP
    from gptqlora.train.arguments import DataArguments

    finetune_help = next(f.metadata["help"] for f in dataclasses.fields(DataArguments) if f.name == "template")
    assert len(available_templates()) >= 3
    for name in available_templates():
        assert f"{name}," in finetune_help or f"{name} " in finetune_help
        assert f"{name}," in CALIBRATION_TEMPLATE_HELP or f"{name} " in CALIBRATION_TEMPLATE_HELP
