"""`gptqlora finetune` end to end on a tiny model: run folder, loss, resume after a kill, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from gptqlora.cli import main

COMMON = ["--bits", "2", "--group_size", "32", "--nsamples", "8", "--micro_batch_size", "4", "--batch_size", "8",
          "--cutoff_len", "512", "--logging_steps", "1", "--learning_rate", "3e-3", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from gptqlora.data.synthetic import string_records

    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in string_records(64, seed=0)))
    return p


def run_cli(args, tmp_path):
    return main(["finetune", *COMMON, *args])


def test_finetune_writes_complete_run_folder_and_loss_falls(tiny_dir, data_file, tmp_path):
    run = tmp_path / "run"
    rc = run_cli(["--base_model", str(tiny_dir), "--data", str(data_file), "--output_dir", str(run),
                  "--max_steps", "12", "--save_steps", "6", "--val_set_size", "8", "--eval_steps", "6"], tmp_path)
    assert rc == 0
    for f in ("run.json", "tokenizer.json", "train_log.jsonl", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors", "base/config.json", "base/quant_report.json", "data/train.jsonl"):
        assert (run / f).is_file(), f
    info = json.loads((run / "run.json").read_text())
    assert info["schema"] == 2 and info["base"] == "base" and info["quant_config"]["bits"] == 2
    assert info["result"]["lora_init"] == "svd"  # --init_method auto at 2 bit with the fp weights at hand
    assert info["result"]["compile"] == "none"  # --compile auto on a CPU
    assert info["args"]["QuantConfig"]["gptaq"] == 0.0  # the svd init's base: quantized without GPTAQ
    assert info["args"]["LoraArguments"]["lora_r"] == 8 and info["args"]["QuantConfig"]["group_size"] == 32
    assert info["data"] == [{"source": str(data_file.resolve()), "copy": "data/train.jsonl"}]
    log = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert any("eval_loss" in r for r in log)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # training loss falls
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"checkpoint-6", "checkpoint-12"}
    from gptqlora.run import load_run

    model = load_run(run, device="cpu")
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    import gptqlora.train.trainer as t

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as a real kill

    orig = t.GPTQLoraTrainer.__init__
    def init(self, *a, **k):
        orig(self, *a, **k)
        self.add_callback(Kill())
    t.GPTQLoraTrainer.__init__ = init
    from gptqlora.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_kill_matches_uninterrupted(tiny_dir, data_file, tmp_path):
    args = [*COMMON, "--base_model", str(tiny_dir), "--data", str(data_file), "--max_steps", "8",
            "--save_steps", "2", "--lora_dropout", "0.1", "--seed", "7"]
    # every run in its own process with the same thread count: float sums must be ordered alike
    env = {**os.environ, "KILL_AT": "5", "OMP_NUM_THREADS": "1"}

    def finetune(*extra):
        return subprocess.run([sys.executable, "-c", KILLER, "finetune", *args, *extra], env=env,
                              capture_output=True, text=True)

    killed = finetune("--output_dir", str(tmp_path / "b"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    ck = tmp_path / "b" / "checkpoints"
    assert (ck / "checkpoint-4" / "COMPLETE").is_file() and not (tmp_path / "b" / "adapter").exists()
    (ck / "checkpoint-6").mkdir()  # a checkpoint cut short while saving: no COMPLETE marker, must be skipped
    env["KILL_AT"] = "-1"
    for r in (finetune("--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "true"),
              finetune("--output_dir", str(tmp_path / "a"))):
        assert r.returncode == 0, r.stderr[-2000:]
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_research_script_flags_reach_the_trainer(monkeypatch, tiny_dir, data_file, tmp_path):
    import gptqlora.commands.finetune as ft

    seen = {}
    monkeypatch.setattr(ft, "finetune", lambda *a: seen.setdefault("args", a) and {})
    monkeypatch.setattr(ft, "main", ft.main)
    argv = ["--base_model", str(tiny_dir), "--quant_checkpoint", str(tmp_path / "q"), "--adapter_name=gptqlora",
            "--target_modules=['q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj']",
            "--use_gradient_checkpointing", "--bits", "2", "--data_path", str(data_file), "--batch_size", "128",
            "--micro_batch_size", "4", "--num_epochs", "3", "--learning_rate", "3e-4", "--cutoff_len", "256",
            "--val_set_size", "120", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
            "--train_on_inputs=False", "--output_dir", str(tmp_path / "out")]
    a = ft.parse_args(argv)
    margs, dargs, largs, targs = a.model, a.data, a.lora, a.train
    assert a.quant.bits == 2 and "bits" in a.given and margs.quant_checkpoint == str(tmp_path / "q")
    assert largs.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert targs.use_gradient_checkpointing is True and dargs.train_on_inputs is False
    assert dargs.data == [str(data_file)] and targs.batch_size == 128 and dargs.val_set_size == 120
    assert largs.lora_dropout == 0.05 and targs.num_epochs == 3


def test_yaml_config_and_overrides(tmp_path):
    import gptqlora.commands.finetune as ft

    cfg = tmp_path / "c.yaml"
    cfg.write_text("quant_checkpoint: /models/q\nlora_r: 16\nlearning_rate: 1.0e-4\nuse_gradient_checkpointing: true\n")
    a = ft.parse_args(["--config", str(cfg), "--lora_r", "32"])
    margs, largs, targs = a.model, a.lora, a.train
    assert margs.quant_checkpoint == "/models/q" and largs.lora_r == 32 and targs.learning_rate == 1e-4
    assert targs.use_gradient_checkpointing is True
    cfg.write_text("lora_rank: 4\n")
    with pytest.raises(ValueError, match="unknown argument.*lora_rank"):
        ft.parse_args(["--config", str(cfg)])


@pytest.mark.parametrize("body,expect", [
    ('{"instruction": "x"}\n', r"train\.jsonl:1.*output"),
    ("", r"train\.jsonl.*empty"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": \n', r"train\.jsonl:2"),
])
def test_bad_data_fails_before_training(tiny_dir, tmp_path, capsys, body, expect):
    import re

    bad = tmp_path / "train.jsonl"
    bad.write_text(body)
    rc = main(["finetune", "--base_model", str(tiny_dir), "--data", str(bad), "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(expect, err), err
    assert not (tmp_path / "r" / "base").exists()  # nothing was quantized or trained


def test_cutoff_shorter_than_prompt(tiny_dir, data_file, tmp_path, capsys):
    rc = main(["finetune", "--base_model", str(tiny_dir), "--data", str(data_file), "--cutoff_len", "16",
               "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "train.jsonl:1" in err and "cutoff_len" in err


def test_existing_run_refused(tiny_dir, data_file, tmp_path, capsys):
    from gptqlora.run import Run

    Run.create(tmp_path / "r").info_file.write_text("{}")  # a folder gptqlora made, holding a run
    rc = main(["finetune", "--base_model", str(tiny_dir), "--data", str(data_file), "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "--resume_from_checkpoint true" in err


def test_builtin_demo_end_to_end(tmp_path, capsys):
    """`gptqlora finetune` with no model arguments: bundled tiny model, 2 bit, bundled data, accuracy."""
    run = tmp_path / "demo"
    assert main(["finetune", "--output_dir", str(run), "--max_steps", "4", "--eval_limit", "4",
                 "--nsamples", "4"]) == 0
    out = capsys.readouterr().out
    assert "task accuracy: fp16" in out and "quantized+lora" in out
    info = json.loads((run / "run.json").read_text())
    assert info["demo"] and info["quant_config"]["bits"] == 2 and info["data_kinds"] == ["alpaca", "cot"]
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) == {"fp16", "quantized", "quantized+lora"} and ev["fp16"]["total"] == 8
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_failed_start_leaves_nothing_and_the_retry_needs_no_overwrite(tiny_run, data_file, tmp_path, capsys):
    """Issue 14 item 3: a checkpoint whose config disagrees with its tensors fails once the model loads, in
    the staging folder; nothing is left, and the corrected command then runs without --overwrite."""
    import shutil

    bad = tmp_path / "bad-ckpt"
    shutil.copytree(tiny_run / "base", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3  # the tensors are 4-bit
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "quantize_config.json").write_text(json.dumps(cfg["quantization_config"]))
    out = tmp_path / "runs" / "r"
    args = ["finetune", "--data", str(data_file), "--output_dir", str(out), "--max_steps", "1", "--batch_size", "4",
            "--micro_batch_size", "4", "--cutoff_len", "512"]
    assert main([*args, "--quant_checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad-ckpt" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # no run, no staging folder, not even the parent it made
    assert main([*args, "--quant_checkpoint", str(tiny_run / "base")]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_late_failure_after_quantizing_removes_the_staged_run(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    import gptqlora.commands.finetune as ft
    from gptqlora.adapters.model import AdapterError

    def fail(*a, **k):
        raise AdapterError("simulated failure while wrapping the model")

    monkeypatch.setattr(ft, "_wrap", fail)
    (tmp_path / "runs").mkdir()
    rc = main(["finetune", *COMMON, "--base_model", str(tiny_dir), "--data", str(data_file),
               "--output_dir", str(tmp_path / "runs" / "r")])
    assert rc == 2 and "simulated failure" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == []  # the quantized base went with the staging folder


def test_ctrl_c_during_an_import_is_reported_as_interrupted(monkeypatch, capsys):
    """Ctrl-C while transformers imports lazily surfaces as another error; it is still an interrupt."""
    import gptqlora.commands.finetune as ft

    def interrupted_import(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ModuleNotFoundError("Could not import module 'LlamaForCausalLM'") from e

    monkeypatch.setattr(ft, "finetune", interrupted_import)
    assert main(["finetune", "--max_steps", "1"]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted\n"


def test_init_method_auto_is_svd_at_low_bits_with_fp_weights():
    from gptqlora.commands.finetune import resolve_init

    assert resolve_init("auto", 2, True) == "svd" and resolve_init("auto", 3, True) == "svd"
    assert resolve_init("auto", 4, True) == "default" and resolve_init("auto", 8, True) == "default"
    assert resolve_init("auto", 2, False) == "default"  # no fp weights: B = 0
    assert resolve_init("aware", 4, True) == "aware"  # an explicit choice stands


def test_base_quantized_without_gptaq_for_an_fp_init_unless_gptaq_given():
    from gptqlora.commands.finetune import base_quant_config, parse_args

    def gptaq(*flags):
        return base_quant_config(parse_args(["--base_model", "m", *flags])).gptaq

    assert gptaq("--bits", "2") == 0.0  # auto -> svd: plain GPTQ base
    assert gptaq("--bits", "4", "--init_method", "aware") == 0.0 and gptaq("--bits", "4", "--init_method", "output") == 0.0
    assert gptaq("--bits", "4") == 1.0  # auto -> B = 0: the quantizer's default stands
    assert gptaq("--bits", "2", "--init_method", "default") == 1.0
    assert gptaq("--bits", "2", "--gptaq", "1") == 1.0 and gptaq("--bits", "2", "--gptaq", "0.25") == 0.25  # given: kept
    assert base_quant_config(parse_args([])).gptaq == 0.0  # the demo: 2 bit, auto -> svd


def test_the_report_shows_the_demo_a_prompt_it_can_answer(capsys):
    from gptqlora.commands.finetune import report

    base = {"run_dir": "runs/x", "steps": 3, "train_loss": 0.5, "accuracy": {"fp16": 0.9}}
    assert report({**base, "demo": True}) == 0
    out = capsys.readouterr().out
    assert "task accuracy: fp16 90.0%" in out and "What is 12 + 7?" in out
    assert report({**base, "demo": False}) == 0 and "12 + 7" not in capsys.readouterr().out
