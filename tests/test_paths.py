"""The data-safety rules (gptqlora/paths.py), one test each, and the exact sequences of issue 14 items 1-2."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from gptqlora import paths
from gptqlora.paths import MARKER, PathError, check_output, output_dir, read_marker, require_dir


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_the_working_directory_and_its_parents_are_never_outputs(tmp_path, monkeypatch):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", str(work), "..", str(tmp_path), str(work / "..")):
        for overwrite in (False, True):
            with pytest.raises(PathError, match="working directory"):
                check_output(out, "--out", overwrite=overwrite)


def test_home_and_root_are_never_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("/", os.path.expanduser("~")):
        with pytest.raises(PathError):
            check_output(out, "--out", overwrite=True)


@pytest.mark.parametrize("rel,expect", [("models/src", "is the input"), ("models/src/inner", "inside the input"),
                                        ("models", "holds the input")])
def test_output_equal_inside_or_holding_an_input_is_refused(tmp_path, monkeypatch, rel, expect):
    (tmp_path / "models" / "src").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(PathError, match=expect):
        check_output(tmp_path / rel, "--out", {"MODEL_DIR src": tmp_path / "models" / "src"}, overwrite=True)


def test_an_output_naming_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PathError, match="is a file"):
        check_output(tmp_path / "f", "--out", overwrite=True)


def test_foreign_folders_are_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    for overwrite in (False, True):
        with pytest.raises(PathError, match="did not write.*mine.txt"):
            check_output(out, "--out", overwrite=overwrite)
        with pytest.raises(PathError):
            with output_dir(out, overwrite=overwrite):
                pass
    assert (out / "mine.txt").read_text() == "user data"


def test_our_folder_needs_overwrite_and_then_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    with output_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert read_marker(out)["entries"] == ["a.txt"]
    with pytest.raises(PathError, match="--overwrite"):
        check_output(out, "--out")
    with output_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert not list(tmp_path.glob(".out.*"))  # no temporaries or old copies left


def test_our_folder_with_a_file_added_by_the_user_is_refused(tmp_path):
    out = tmp_path / "out"
    with output_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("1")
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(PathError, match="notes.txt"):
        check_output(out, "--out", overwrite=True)


def test_a_failure_leaves_nothing_and_the_old_output_intact(tmp_path):
    out = tmp_path / "out"
    with output_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with output_dir(out, overwrite=True) as tmp:
                (tmp / "a.txt").write_text("new, half written")
                raise exc()
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_get_ordinary_permissions(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with output_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == 0o755 and mode(tmp_path / "out" / "sub") == 0o755
    assert mode(tmp_path / "out" / "model.safetensors") == 0o644


def test_temporaries_of_a_killed_process_are_removed_by_the_next_writer(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abcdef12"
    stale.mkdir()
    paths.write_marker(stale, "model")
    foreign = tmp_path / f".out.tmp-{dead}-notours"  # no marker: not ours, kept
    foreign.mkdir()
    live = tmp_path / f".out.tmp-{os.getppid()}-abcdef12"  # a running process's: kept
    live.mkdir()
    paths.write_marker(live, "model")
    other_name = tmp_path / f".20261201-101010.tmp-{dead}-abcdef12"  # a killed run named by its start time
    other_name.mkdir()
    paths.write_marker(other_name, "run")
    with output_dir(out):
        pass
    assert not stale.exists() and not other_name.exists() and foreign.exists() and live.exists()


# -- the exact sequences of issue 14 ---------------------------------------------------------------------


@pytest.fixture()
def users_folder(tmp_path, monkeypatch):
    """A folder holding only the user's script and training data, as the working directory."""
    from gptqlora.data.synthetic import string_records

    work = tmp_path / "project"
    work.mkdir()
    (work / "my_script.py").write_text("print('hello')\n")
    (work / "train.jsonl").write_text("\n".join(json.dumps(r) for r in string_records(8, seed=0)))
    (work / "sub").mkdir()
    (work / "sub" / "notes.txt").write_text("keep me\n")
    monkeypatch.chdir(work)
    return work


def test_item1_finetune_output_dir_dot_then_overwrite_loses_nothing(users_folder, capsys):
    from gptqlora.cli import main

    before = snapshot(users_folder)
    for extra in ([], ["--overwrite"]):  # the first refusal, then "following the advice"
        rc = main(["finetune", "--data", "train.jsonl", "--output_dir", ".", "--max_steps", "1", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "working directory" in err and "Traceback" not in err
        assert "--overwrite" not in err  # never advised for the working directory
    for extra in ([], ["--overwrite"]):  # a subfolder holding the user's files
        rc = main(["finetune", "--data", "train.jsonl", "--output_dir", "sub", "--max_steps", "1", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "did not write" in err and "notes.txt" in err
    assert snapshot(users_folder) == before


def test_item2_merge_into_the_run_itself_is_refused(tiny_dir, tmp_path, monkeypatch, capsys):
    from gptqlora.cli import main
    from runs import make_run

    run = make_run(tiny_dir, tmp_path / "runs" / "run")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before = snapshot(run)
    for out in (str(run), str(run / "merged"), str(run.parent)):
        rc = main(["merge", str(run), "--to", "fp16", "--out", out, "--overwrite"])
        err = capsys.readouterr().err
        assert rc == 2 and "RUN_DIR" in err and "Traceback" not in err, err
    assert snapshot(run) == before


def test_item2_quantize_onto_its_source_is_refused(tiny_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from gptqlora.cli import main

    src = tmp_path / "models" / "fp"
    shutil.copytree(tiny_dir, src)
    (src.parent / "beside.txt").write_text("a file beside the model")
    (tmp_path / "calib.txt").write_text("some calibration text " * 50)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    for out in (str(src), str(src / "q"), str(src.parent)):
        rc = main(["quantize", str(src), out, "--overwrite", "--calibration", "calib.txt"])
        err = capsys.readouterr().err
        assert rc == 2 and "MODEL_DIR" in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_the_hub_hint_is_for_models_not_run_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PathError, match="hf download") as e:
        require_dir("org/model", "--base", "checkpoint folder")
    assert str(e.value).startswith("--base org/model: no such checkpoint folder; ")
    with pytest.raises(PathError) as e:  # made by finetune, never downloaded
        require_dir("runs/nope", "RUN_DIR", "run folder")
    assert str(e.value) == "RUN_DIR runs/nope: no such run folder"
