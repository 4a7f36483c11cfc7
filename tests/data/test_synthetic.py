import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from gptqlora.data import synthetic
from gptqlora.data.records import read_records
from gptqlora.data.templates import PromptTemplate


def test_generators_are_deterministic():
    assert synthetic.string_records(50, seed=7) == synthetic.string_records(50, seed=7)
    assert synthetic.arithmetic_records(50, seed=7) == synthetic.arithmetic_records(50, seed=7)
    assert synthetic.string_records(50, seed=7) != synthetic.string_records(50, seed=8)


def test_arithmetic_example_format():
    rec = synthetic.arithmetic_record(random.Random(0))
    assert rec["question"].startswith("What is ") and rec["question"].endswith("?")
    assert set(rec) == {"question", "rationale", "answer", "task"}


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 99), st.integers(2, 5))
def test_arithmetic_is_correct(seed, max_operand, max_terms):
    rec = synthetic.arithmetic_record(random.Random(seed), max_terms=max_terms, max_operand=max_operand)
    expr = rec["question"][len("What is "):-1]
    assert eval(expr) == int(rec["answer"]) >= 0  # noqa: S307 - digits and +/- only
    steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", rec["rationale"])
    assert len(steps) == len(expr.split()) // 2
    for a, op, b, c in steps:
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
    assert steps[-1][3] == rec["answer"]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(synthetic.STRING_TASKS))
def test_string_tasks(seed, task):
    rec = synthetic.string_record(random.Random(seed), task=task)
    word = rec["input"] or re.search(r"'([a-z]+)'", rec["instruction"]).group(1)
    expected = {
        "reverse": word[::-1], "upper": word.upper(), "capitalize": word.capitalize(),
        "sort": "".join(sorted(word)), "length": str(len(word)), "first": word[0], "last": word[-1],
    }.get(task)
    if task == "repeat":
        n = int(re.search(r"(\d) times", rec["instruction"]).group(1))
        expected = " ".join([word] * n)
    assert rec["output"] == expected and rec["task"] == task


def test_score_and_answer_of():
    cot = {"question": "What is 2 + 3?", "rationale": "2 + 3 = 5.", "answer": "5"}
    assert synthetic.answer_of(cot) == "5"
    assert synthetic.score(cot, "2 + 3 = 5.\nThe answer is 5.")
    assert synthetic.score(cot, "The answer is 4.\nThe answer is 5.")  # the last one counts
    assert not synthetic.score(cot, "2 + 3 = 5.\nThe answer is 6.")
    assert not synthetic.score(cot, "5")  # no final answer line
    alp = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}
    assert synthetic.answer_of(alp) == "cba"
    assert synthetic.score(alp, " cba\n") and not synthetic.score(alp, "cbaa")
    chat = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert synthetic.answer_of(chat) == "y"


def test_score_matches_template_rendering():
    cot = PromptTemplate.load("cot")
    for rec in synthetic.arithmetic_records(20, seed=3):
        assert synthetic.score(rec, cot.response(rec))


def test_split_unique_keeps_eval_out_of_train():
    recs = synthetic.string_records(300, seed=1, max_len=3)
    train, evals = synthetic.split_unique(recs, n_eval=50)
    assert len(evals) == 50
    keys = {synthetic.record_key(r) for r in evals}
    assert len(keys) == 50 and not keys & {synthetic.record_key(r) for r in train}


def test_bundled_data_files(tmp_path):
    from gptqlora.data.assets import default_data_files, eval_data_files

    train_files, eval_files = default_data_files(), eval_data_files()
    for train_path, eval_path in zip(train_files, eval_files):
        train, evals = read_records(train_path), read_records(eval_path)
        assert train.kind == evals.kind and len(train) >= 2000 and len(evals) == 200
        eval_keys = {synthetic.record_key(r) for r in evals.records}
        assert not eval_keys & {synthetic.record_key(r) for r in train.records}
        assert all(synthetic.score(r, r.get("output") or f"The answer is {r['answer']}.") for r in evals.records)
