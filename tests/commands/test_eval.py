"""`gptqlora eval`: perplexity, the synthetic suite and the lm-eval bridge; bad input is one line, exit 2."""

import json
import sys
import types

import pytest

from gptqlora.cli import main


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return f


def test_run_folder_perplexity_and_tasks_json(tiny_run, text_file, tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(["eval", str(tiny_run), "--perplexity", str(text_file), "--seqlen", "128", "--tasks", "synthetic",
               "--limit", "2", "--out", str(out)])
    assert rc == 0 and "perplexity" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["seqlen"] == 128 and r["tokens"] == r["windows"] * 128 > 0 and r["perplexity"] > 1
    assert r["model"]["kind"] == "run" and r["model"]["adapter"].endswith("adapter")
    assert r["tasks"]["synthetic"]["total"] == 4 and 0 <= r["tasks"]["synthetic"]["accuracy"] <= 1
    import torch

    assert torch.is_grad_enabled()  # evaluating must not switch autograd off for the caller (later tests)


def test_adapter_changes_the_perplexity(tiny_run, text_file, capsys):
    def ppl(*extra):
        assert main(["eval", str(tiny_run), "--perplexity", str(text_file), "--seqlen", "128", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    with_adapter, base = ppl(), ppl("--no-adapter")
    assert base["model"]["adapter"] is None and with_adapter["perplexity"] != base["perplexity"]
    assert with_adapter["tokens"] == base["tokens"]


def test_fp_model_and_default_seqlen_fits_the_context(tiny_dir, text_file, capsys):
    assert main(["eval", str(tiny_dir), "--perplexity", str(text_file)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"]["kind"] == "fp" and r["seqlen"] == 512  # the tiny model's context, not 2048


def _fake_lm_eval(monkeypatch, tasks):
    lm_eval = types.ModuleType("lm_eval")
    tasks_mod = types.ModuleType("lm_eval.tasks")
    tasks_mod.TaskManager = type("TaskManager", (), {"all_tasks": tasks})
    lm_eval.tasks = tasks_mod
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks_mod)


@pytest.mark.parametrize("case", ["missing", "empty", "short", "seqlen", "nothing", "not_a_model", "task",
                                  "no_lm_eval", "synthetic_typo", "limit_0"])
def test_bad_input_is_one_clear_line(case, tiny_run, tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("hi")
    argv, expect = {
        "missing": (["--perplexity", str(tmp_path / "nope.txt")], "nope.txt: no such file"),
        "empty": (["--perplexity", str(empty)], "empty.txt: the file is empty"),
        "short": (["--perplexity", str(short), "--seqlen", "64"], "fewer than one window"),
        "seqlen": (["--perplexity", str(text_file), "--seqlen", "100000"], "longer than the model's context"),
        "nothing": (["--device", "cpu"], "nothing to evaluate"),
        "not_a_model": (["--tasks", "synthetic"], "no config.json or run.json"),
        "task": (["--tasks", "synthetic,arc_eazy"], "no task 'arc_eazy' (did you mean arc_easy"),
        "no_lm_eval": (["--tasks", "mmlu"], "lm-evaluation-harness, which is not installed"),
        "synthetic_typo": (["--tasks", "synthetc"], "did you mean 'synthetic'"),  # before asking for lm-eval
        "limit_0": (["--tasks", "synthetic", "--limit", "0"], "--limit: must be >= 1, got 0"),
    }[case]
    if case == "task":
        _fake_lm_eval(monkeypatch, ["arc_easy", "arc_challenge", "mmlu"])
    if case in ("no_lm_eval", "synthetic_typo"):
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    rc = main(["eval", str(tmp_path if case == "not_a_model" else tiny_run), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

