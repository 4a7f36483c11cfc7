"""The run folder as an object: one schema, data kept with the run, and a moved run still works."""

import io
import json
import shutil

import pytest
import torch

from gptqlora.cli import main
from gptqlora.data.templates import PromptTemplate
from gptqlora.run import SCHEMA, Run, RunError


def write_data(path, n=32):
    from gptqlora.data.synthetic import string_records

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in string_records(n, seed=0)))
    return path


def test_moved_run_still_merges_chats_and_generates(tiny_dir, tmp_path, monkeypatch, capsys):
    """Started with a relative data path from one folder; moved; used from another folder."""
    work = tmp_path / "work"
    write_data(work / "data" / "train.jsonl")
    monkeypatch.chdir(work)
    assert main(["finetune", "--base_model", str(tiny_dir), "--data", "data/train.jsonl", "--output_dir", "runs/r",
                 "--bits", "4", "--group_size", "32", "--nsamples", "4", "--max_steps", "2", "--batch_size", "4",
                 "--micro_batch_size", "4", "--cutoff_len", "512"]) == 0
    moved = tmp_path / "elsewhere" / "r"
    moved.parent.mkdir()
    shutil.move(work / "runs" / "r", moved)
    shutil.rmtree(work)  # the data it was started with is gone too
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    capsys.readouterr()

    # merge --to gptq calibrates on the run's training data: the copy kept in the run
    assert main(["merge", str(moved), "--to", "gptq", "--bits", "8", "--group-size", "32", "--nsamples", "4",
                 "--seqlen", "32", "--out", "m"]) == 0
    assert "re-quantized to 8 bit" in capsys.readouterr().out
    from gptqlora.checkpoint import load_quantized

    with torch.no_grad():
        assert torch.isfinite(load_quantized("m", device="cpu", dtype=torch.float32)(torch.tensor([[5, 6]])).logits).all()

    (tmp_path / "other" / "p.txt").write_text("Reverse the word cat\n")
    assert main(["generate", str(moved), "--prompts", "p.txt", "--device", "cpu", "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["adapter"] for r in rows] == ["r"] and isinstance(rows[0]["response"], str)

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(moved), "--device", "cpu", "--max-new-tokens", "4"]) == 0
    assert "/help for commands" in capsys.readouterr().out


def test_record_copies_data_and_reads_back(tmp_path):
    data = write_data(tmp_path / "d" / "train.jsonl", 4)
    other = write_data(tmp_path / "e" / "train.jsonl", 4)  # same file name, other folder
    run = Run.create(tmp_path / "run")
    run.record(run.own_base_dir, [data, other], ["alpaca"], PromptTemplate.load("cot"), demo=True)
    raw = json.loads(run.info_file.read_text())
    assert raw["schema"] == SCHEMA and raw["base"] == "base" and raw["demo"] is True
    assert [d["copy"] for d in raw["data"]] == ["data/0-train.jsonl", "data/1-train.jsonl"]
    again = Run.open(tmp_path / "run")
    assert again.template().name == "cot" and again.info.data_kinds == ["alpaca"]
    data.unlink()
    assert again.data_files() == [run.data_dir / "0-train.jsonl", run.data_dir / "1-train.jsonl"]
    (run.data_dir / "0-train.jsonl").unlink()  # neither the copy nor the source: a clear error
    with pytest.raises(RunError, match="training data .*train.jsonl is gone.*--calibration"):
        again.data_files()
    with pytest.raises(RunError, match="base checkpoint .* is missing"):
        again.base_dir()
    with pytest.raises(RunError, match="no trained adapter"):
        again.adapter()


def test_create_refuses_an_existing_run_unless_overwrite_or_resume(tmp_path):
    Run.create(tmp_path / "r").info_file.write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        Run.create(tmp_path / "r")
    assert Run.create(tmp_path / "r", resume=True).info_file.is_file()
    assert not Run.create(tmp_path / "r", overwrite=True).info_file.exists()


def test_bad_run_json(tmp_path):
    with pytest.raises(RunError, match="no run.json"):
        Run.open(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        Run.open(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"schema": SCHEMA + 1}))
    with pytest.raises(RunError, match="newer"):
        Run.open(tmp_path)


def test_a_run_from_before_the_marker_resumes_but_is_never_overwritten(tmp_path):
    from gptqlora.paths import MARKER, PathError

    old = tmp_path / "old-run"
    old.mkdir()
    (old / "run.json").write_text("{}")
    (old / "train_log.jsonl").write_text("")
    with pytest.raises(PathError, match="older gptqlora"):
        Run.start(old, overwrite=True)
    assert Run.start(old, resume=True).root == old  # continued in place; nothing removed
    assert not (old / MARKER).exists() and (old / "train_log.jsonl").exists()


def test_a_started_run_is_hidden_until_published(tmp_path):
    run = Run.start(tmp_path / "runs" / "r")
    assert run.staged and not (tmp_path / "runs" / "r").exists() and run.root.name.startswith(".r.tmp-")
    run.info_file.write_text("{}")
    run.publish()
    assert run.root == tmp_path / "runs" / "r" and Run.is_run(run.root) and not run.staged
    other = Run.start(tmp_path / "fresh" / "r")
    other.discard()
    assert not (tmp_path / "fresh").exists()
