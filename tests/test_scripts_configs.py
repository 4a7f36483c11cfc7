"""scripts/finetune_multi passes the research flags through accelerate to the trainer; configs are runnable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEVEN = "['q_proj','k_proj','v_proj','o_proj','gate_proj','up_proj','down_proj']"


def test_finetune_multi_research_one_liner_dry_run(tmp_path):
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    cmd = [str(ROOT / "scripts" / "finetune_multi"), "llama65b-2bit", str(data),
           "--base_model", "models/llama-65b", "--quant_checkpoint", "models/llama-65b-2bit",
           "--adapter_name=gptqlora", f"--target_modules={SEVEN}", "--use_gradient_checkpointing", "--bits", "2",
           "--batch_size", "128", "--micro_batch_size", "4", "--dry_run"]
    env = {**os.environ, "PYTHON": sys.executable, "RUNS_DIR": str(tmp_path / "runs"), "MAIN_PORT": "29613"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    a = out["args"]
    assert a["QuantConfig"]["bits"] == 2 and a["ModelArguments"]["quant_checkpoint"] == "models/llama-65b-2bit"
    assert a["LoraArguments"]["target_modules"] == eval(SEVEN) and a["LoraArguments"]["adapter_name"] == "gptqlora"
    assert a["TrainArguments"]["use_gradient_checkpointing"] is True
    assert a["TrainArguments"]["output_dir"] == str(tmp_path / "runs" / "llama65b-2bit")
    assert a["DataArguments"]["data"] == [str(data)]
    assert out["trainer"]["gradient_accumulation_steps"] == 128 // 4 and out["world_size"] == 1


def test_finetune_multi_takes_several_data_files(tmp_path):
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for f in files:
        f.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    env = {**os.environ, "PYTHON": sys.executable, "RUNS_DIR": str(tmp_path / "runs"), "MAIN_PORT": "29614"}
    script = str(ROOT / "scripts" / "finetune_multi")
    r = subprocess.run([script, "two", ",".join(map(str, files)), "--dry_run"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout[r.stdout.index("{"):])["args"]["DataArguments"]["data"] == list(map(str, files))
    r = subprocess.run([script, "two", f"{files[0]},{tmp_path / 'missing.jsonl'}"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "missing.jsonl' not found" in r.stderr


def test_finetune_multi_usage():
    r = subprocess.run([str(ROOT / "scripts" / "finetune_multi")], capture_output=True, text=True)
    assert r.returncode == 2 and "NUM_GPUS" in r.stderr


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("llama-*.yaml")), ids=lambda p: p.name)
def test_configs_parse_and_name_their_command(config):
    from gptqlora.commands.finetune import parse_args

    first = config.read_text().splitlines()[0]
    assert first.startswith("# scripts/finetune_multi ") and f"--config configs/{config.name}" in first
    a = parse_args(["--config", str(config)])
    assert a.model.quant_checkpoint and a.quant.bits in (2, 4) and len(a.lora.target_modules) == 7
    assert a.train.batch_size == 128
