"""`gptqlora generate` and the inference pieces `chat` shares: prompt rendering, batching, prompt files, errors."""

import io
import json
import re
import shutil

import pytest

from gptqlora.cli import main
from gptqlora.data.templates import PromptTemplate
from gptqlora.data.tokenize import encode_prompt
from gptqlora.commands.generate import read_prompts
from gptqlora.inference import (InferenceError, PromptFormat, Sampling, generate_responses, load_model,
                                parse_adapter_spec)

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def other_adapter(tiny_dir, tmp_path_factory):
    """A second adapter for the same base, with other random weights."""
    from runs import make_run

    return make_run(tiny_dir, tmp_path_factory.mktemp("gen") / "run2", seed=1) / "adapter"


@pytest.fixture(scope="module")
def loaded(run):
    return load_model(run, device="cpu")


def gen(args, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(["generate", *args, "--device", "cpu", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines()], err


def test_one_json_line_per_prompt_in_input_order(run, tmp_path, capsys):
    prompts = ["Reverse the word cat", "hi", "", "Sort these letters: d b a c, please, all of them"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(prompts) + "\n")
    rc, rows, _ = gen([str(run), "--prompts", str(f), "--batch-size", "2"], capsys)
    assert rc == 0
    assert [r["prompt"] for r in rows] == [p for p in prompts if p]  # blank lines skipped, order kept
    assert all(r["adapter"] == "run1" and isinstance(r["response"], str) for r in rows)
    assert any(r["response"] for r in rows)


def test_stdin_jsonl_extra_fields_and_several_adapters(run, capsys, monkeypatch):
    lines = [json.dumps({"id": i, "prompt": p}) for i, p in enumerate(["abc", "Upper-case: hello"])]
    rc, rows, _ = gen([str(run), "--prompts", "-", "--format", "jsonl", "--use", "run1,off"], capsys,
                      stdin="\n".join(lines), monkeypatch=monkeypatch)
    assert rc == 0
    assert [(r["id"], r["adapter"]) for r in rows] == [(0, "run1"), (0, None), (1, "run1"), (1, None)]
    assert rows[0]["response"] != rows[1]["response"]  # the (random) adapter changes the output


def test_batched_left_padding_matches_one_at_a_time(loaded):
    fmt = loaded.prompt_format()
    ids = [fmt.encode([], p, loaded.tokenizer) for p in ["a", "a much longer prompt than the first one", "mid"]]
    s = Sampling(max_new_tokens=6)
    assert generate_responses(loaded.model, loaded.tokenizer, ids, s, batch_size=3) == \
        generate_responses(loaded.model, loaded.tokenizer, ids, s, batch_size=1)


def test_sampling_is_reproducible_with_seed(run, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("hello\nworld\n")
    args = [str(run), "--prompts", str(f), "--temperature", "1.5", "--top-p", "0.95", "--seed", "3"]
    first, second = gen(args, capsys)[1], gen(args, capsys)[1]
    assert first == second
    greedy = gen([str(run), "--prompts", str(f)], capsys)[1]
    assert [r["response"] for r in greedy] != [r["response"] for r in first]


def test_extra_adapter_by_name_and_by_run_folder(run, other_adapter, loaded, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("hello\n")
    rc, rows, _ = gen([str(run), "--adapter", f"b={other_adapter}", "--adapter", str(other_adapter.parent),
                       "--prompts", str(f), "--use", "run1,b,run2"], capsys)
    assert rc == 0
    assert [r["adapter"] for r in rows] == ["run1", "b", "run2"]
    assert rows[1]["response"] == rows[2]["response"] != rows[0]["response"]
    assert parse_adapter_spec(f"x={other_adapter}") == ("x", other_adapter)
    with pytest.raises(InferenceError, match="NAME=PATH"):
        parse_adapter_spec(f"a.b={other_adapter}")


def test_template_history_renders_as_consecutive_examples(loaded):
    tpl = PromptTemplate.load("alpaca_short")
    fmt = PromptFormat("template", tpl, system="Be brief.")
    text = fmt.text([("q1", "a1")], "q2", loaded.tokenizer)
    assert text == ("Be brief.\n\n" + tpl.prompt({"instruction": "q1"}) + "a1\n\n"
                    + tpl.prompt({"instruction": "q2"}))
    cot = PromptFormat("template", PromptTemplate.load("cot"))
    assert cot.text([], "2+2?", loaded.tokenizer).endswith("### Question:\n2+2?\n\n### Answer:\n")
    assert fmt.encode([], "q", loaded.tokenizer) == encode_prompt(loaded.tokenizer, fmt.text([], "q", None))


def test_chat_template_rendering(loaded, monkeypatch):
    tok = loaded.tokenizer
    monkeypatch.setattr(tok, "chat_template", CHAT_TEMPLATE, raising=False)
    fmt = loaded.prompt_format(chat_template=True, system="sys")
    assert fmt.text([("u1", "a1")], "u2", tok) == "<s><system>sys<user>u1<assistant>a1</s><user>u2<assistant>"
    assert fmt.encode([], "u", tok).count(tok.bos_token_id) == 1  # the template's BOS only
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(InferenceError, match="no chat_template"):
        loaded.prompt_format(chat_template=True)


def test_read_prompts_formats(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "k": 1}\n\n{"prompt": "b", "input": "ctx"}\n')
    assert read_prompts(str(f)) == [(f"{f}:1", {"prompt": "a", "k": 1}),
                                    (f"{f}:3", {"prompt": "b", "input": "ctx"})]
    assert read_prompts("-", stdin=io.StringIO('{"x": 1}\n'))[0][1] == {"prompt": '{"x": 1}'}  # text by default


@pytest.mark.parametrize("content, match", [
    ("", "no prompts"),
    ("\n  \n", "no prompts"),
    ('{"prompt": "ok"}\n{"prompt": "cut', r"p\.jsonl:2: invalid JSON"),
    ('{"prompt": "ok"}\n["x"]\n', r"p\.jsonl:2: needs a \"prompt\" string"),
    ('{"prompt": 3}\n', r"p\.jsonl:1: needs a \"prompt\" string"),
])
def test_bad_prompts_file(run, tmp_path, capsys, content, match):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    rc, rows, err = gen([str(run), "--prompts", str(f)], capsys)
    assert rc == 2 and not rows
    assert err.startswith("gptqlora generate: error:") and err.count("\n") == 1
    assert re.search(match, err), err


def test_prompt_too_long_names_the_line(run, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("short\n" + "x" * 600 + "\n")
    rc, rows, err = gen([str(run), "--prompts", str(f)], capsys)
    assert rc == 2 and not rows and f"{f}:2: the prompt is" in err


def test_bad_runs_and_options(run, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("hi\n")
    no_adapter = tmp_path / "run"
    shutil.copytree(run, no_adapter, ignore=shutil.ignore_patterns("adapter"))
    cases = [
        ([str(no_adapter)], "no trained adapter"),
        ([str(tmp_path)], "no run.json"),
        ([], "give a run folder"),
        ([str(run), "--use", "nope"], "no adapter 'nope'"),
        ([str(run), "--temperature", "-1"], "--temperature"),
        ([str(run), "--max-context", "8"], "leaves no room"),
        ([str(run), "--chat-template"], "no chat_template"),
    ]
    for args, match in cases:
        rc, rows, err = gen([*args, "--prompts", str(f)], capsys)
        assert rc == 2 and not rows and match in err, (args, err)


def test_base_plus_adapter_equals_the_run(run, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("hello\n")
    from_run = gen([str(run), "--prompts", str(f)], capsys)[1]
    rc, rows, _ = gen(["--base", str(run / "base"), "--adapter", f"a={run / 'adapter'}", "--prompts", str(f),
                       "--use", "a,off"], capsys)
    assert rc == 0 and rows[0]["response"] == from_run[0]["response"]
    bare = gen(["--base", str(run / "base"), "--prompts", str(f)], capsys)[1]  # no adapter at all
    assert bare[0]["adapter"] is None and bare[0]["response"] == rows[1]["response"]


def test_runs_trained_on_chat_data_use_the_chat_template(tmp_path):
    from gptqlora.run import Run, sniff_data_kinds

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    array = tmp_path / "chat.json"
    array.write_text(json.dumps([json.loads(chat.read_text())], indent=2))
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    assert sniff_data_kinds([chat, array]) == ["chat"]
    assert sniff_data_kinds([chat, alpaca]) == ["alpaca", "chat"]  # mixed: the prompt template
    assert sniff_data_kinds([tmp_path / "gone.jsonl"]) == [] and sniff_data_kinds([]) == []
    # a run.json from before the schema (no data_kinds): the kinds come from its files
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"base": "base", "data": [str(chat), str(array)],
                                              "template": PromptTemplate.load("alpaca").to_dict()}))
    assert Run.open(old).chat_data and Run.open(old).info.schema == 2
