"""`gptqlora quantize` end to end through the console entry point."""

import json
import subprocess
import sys

import pytest

from gptqlora.cli import main


def test_help_explains():
    r = subprocess.run([sys.executable, "-m", "gptqlora.cli", "quantize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--bits", "--group-size", "--desc-act", "--asym", "--static-groups", "--damp", "--calibration",
                 "--nsamples", "--seqlen", "--format"):
        assert flag in r.stdout


def test_quantize_cli(tiny_dir, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"the quick brown fox {i} jumps"}) for i in range(50)))
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_dir), str(out), "--bits", "3", "--group-size", "32", "--desc-act",
               "--calibration", str(calib), "--nsamples", "4", "--seqlen", "64"])
    assert rc == 0 and "worst block relative output error" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 3 and cfg["group_size"] == 32 and cfg["desc_act"] is True
    assert (out / "tokenizer.json").is_file() and (out / "quant_report.json").is_file()


@pytest.mark.parametrize("body,expect", [("", "no usable calibration text"),
                                         ('{"x": 1}\n', "cannot tell the record kind")])
def test_bad_calibration_is_one_clear_line(tiny_dir, tmp_path, capsys, body, expect):
    calib = tmp_path / "c.jsonl"
    calib.write_text(body)
    rc = main(["quantize", str(tiny_dir), str(tmp_path / "q"), "--calibration", str(calib)])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "c.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_template_renders_training_records(tiny_dir, tmp_path, capsys, monkeypatch):
    """--template reaches the calibration reader: Alpaca records render with it, as finetune --template would."""
    import gptqlora.quant.api as api

    seen = []
    real = api.load_calibration

    def spy(path, tokenizer, nsamples, seqlen, seed, template):
        seen.append(template.name)
        return real(path, tokenizer, nsamples, seqlen, seed, template)

    monkeypatch.setattr(api, "load_calibration", spy)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"instruction": f"Add {i} and 3.", "input": "", "output": str(i + 3)})
                               for i in range(20)))
    for name in ("alpaca_short", str(tmp_path / "mine.json")):
        if name.endswith(".json"):
            (tmp_path / "mine.json").write_text(json.dumps(
                {"prompt_input": "Q: {instruction} {input}\nA: ", "prompt_no_input": "Q: {instruction}\nA: ",
                 "response_split": "A: "}))
        out = tmp_path / f"q-{len(seen)}"
        assert main(["quantize", str(tiny_dir), str(out), "--bits", "4", "--calibration", str(calib),
                     "--nsamples", "2", "--seqlen", "32", "--template", name]) == 0
    assert seen == ["alpaca_short", "mine"]


@pytest.mark.parametrize("command", ["quantize", "analyze"])
def test_unknown_template_is_one_clear_line(tiny_dir, tmp_path, capsys, command):
    calib = tmp_path / "c.jsonl"
    calib.write_text(json.dumps({"text": "hello there"}) + "\n")
    out = tmp_path / "q"
    where = [str(out)] if command == "quantize" else ["--out", str(out)]
    rc = main([command, str(tiny_dir), *where, "--calibration", str(calib), "--template", "alpacca"])
    err = capsys.readouterr().err
    assert rc == 2 and "--template alpacca: unknown prompt template" in err and "Traceback" not in err
    assert not out.exists()
