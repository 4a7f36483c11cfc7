"""Bad invocations of every command, as a careless user types them (issue 14): each must exit with status
2, print one clear line on stderr (naming the option or file), no traceback, and leave every file of the
inputs and the working directory as it was. A missing path must fail at once (no Hub lookups).

All cases run in one subprocess (tests/cli_driver.py), so torch and transformers are imported once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()

# (id, command line with {placeholders} for the workspace, a word the error line must contain)
CASES = [
    # finetune: numbers out of range, caught while parsing
    ("ft-micro-batch-0", "finetune --quant_checkpoint {q4} --data {data} --micro_batch_size 0", "--micro_batch_size"),
    ("ft-batch-0", "finetune --quant_checkpoint {q4} --data {data} --batch_size 0", "--batch_size"),
    ("ft-lora-r-0", "finetune --quant_checkpoint {q4} --data {data} --lora_r 0", "--lora_r"),
    ("ft-lr-negative", "finetune --quant_checkpoint {q4} --data {data} --learning_rate=-1e-3", "--learning_rate"),
    ("ft-lr-0", "finetune --quant_checkpoint {q4} --data {data} --learning_rate 0", "--learning_rate"),
    ("ft-dropout-2", "finetune --quant_checkpoint {q4} --data {data} --lora_dropout 2", "--lora_dropout"),
    ("ft-epochs-0", "finetune --quant_checkpoint {q4} --data {data} --num_epochs 0", "--num_epochs"),
    ("ft-epochs-negative", "finetune --quant_checkpoint {q4} --data {data} --num_epochs -1", "--num_epochs"),
    ("ft-max-steps-0", "finetune --quant_checkpoint {q4} --data {data} --max_steps 0", "--max_steps"),
    ("ft-seqlen-0", "finetune --base_model {fp} --data {data} --seqlen 0", "--seqlen"),
    ("ft-cutoff-0", "finetune --quant_checkpoint {q4} --data {data} --cutoff_len 0", "--cutoff_len"),
    ("ft-not-a-number", "finetune --quant_checkpoint {q4} --data {data} --lora_r eight", "--lora_r"),
    ("ft-bad-choice", "finetune --quant_checkpoint {q4} --data {data} --lr_scheduler bogus", "--lr_scheduler"),
    ("ft-unknown-option", "finetune --quant_checkpoint {q4} --data {data} --no_such_option 1", "--no_such_option"),
    ("ft-base-is-quantized", "finetune --base_model {q4} --data {data}", "pass it as --quant_checkpoint"),
    ("ft-epochs", "finetune --quant_checkpoint {q4} --data {data} --epochs 1", "(did you mean --num_epochs?)"),
    # finetune: where it would write
    ("ft-output-cwd", "finetune --quant_checkpoint {q4} --data train.jsonl --output_dir .", "working directory"),
    ("ft-output-cwd-overwrite", "finetune --quant_checkpoint {q4} --data train.jsonl --output_dir . --overwrite",
     "working directory"),
    ("ft-output-foreign", "finetune --quant_checkpoint {q4} --data {data} --output_dir sub", "did not write"),
    ("ft-output-foreign-overwrite", "finetune --quant_checkpoint {q4} --data {data} --output_dir sub --overwrite",
     "did not write"),
    ("ft-output-file", "finetune --quant_checkpoint {q4} --data {data} --output_dir {afile}", "is a file"),
    ("ft-output-holds-data", "finetune --quant_checkpoint {q4} --data {data} --output_dir {datadir} --overwrite",
     "holds the input"),
    ("ft-output-is-checkpoint", "finetune --quant_checkpoint {q4} --data {data} --output_dir {q4} --overwrite",
     "is the input"),
    ("ft-output-parent", "finetune --quant_checkpoint {q4} --data {data} --output_dir .. --overwrite",
     "working directory"),
    # finetune: inputs
    ("ft-missing-checkpoint", "finetune --quant_checkpoint models/llama-7b-2bit --data {data}", "--quant_checkpoint"),
    ("ft-missing-base", "finetune --base_model {ws}/nosuch --data {data}", "--base_model"),
    ("ft-readme-config", "finetune --config {repo}/configs/llama-7b-2bit.yaml", "llama-7b-2bit.yaml"),
    ("ft-missing-config", "finetune --config nosuch.yaml", "--config"),
    ("ft-missing-data", "finetune --quant_checkpoint {q4} --data nosuch.jsonl", "nosuch.jsonl"),
    ("ft-data-dir", "finetune --quant_checkpoint {q4} --data {datadir}", "directory"),
    ("ft-template", "finetune --quant_checkpoint {q4} --data {data} --template nosuch", "--template"),
    ("ft-bits-mismatch", "finetune --quant_checkpoint {q2} --data {data} --bits 4 --output_dir {ws}/r1", "--bits"),
    ("ft-truncated-checkpoint", "finetune --quant_checkpoint {qtrunc} --data {data} --output_dir {ws}/r2",
     "truncated"),
    ("ft-targets-match-nothing", "finetune --quant_checkpoint {q4} --data {data} --target_modules nosuch_proj "
     "--output_dir {ws}/r3", "nosuch_proj"),
    ("ft-targets-typo", "finetune --quant_checkpoint {q4} --data {data} --target_modules q_prj,v_proj "
     "--output_dir {ws}/r3", "did you mean 'q_proj' for 'q_prj'?"),
    ("ft-adapter-name", "finetune --quant_checkpoint {q4} --data {data} --adapter_name ia3", "--adapter_name"),
    ("ft-svd-without-base", "finetune --quant_checkpoint {q4} --data {data} --init_method svd", "--base_model"),
    # quantize
    ("q-src-is-out", "quantize {fp} {fp} --overwrite --calibration {calib}", "is the input"),
    ("q-out-inside-src", "quantize {fp} {fp}/q --calibration {calib}", "inside the input"),
    ("q-out-holds-src", "quantize {fp} {ws} --overwrite --calibration {calib}", "holds"),
    ("q-out-cwd", "quantize {fp} . --calibration {calib}", "working directory"),
    ("q-missing-model", "quantize models/llama-7b {ws}/q --calibration {calib}", "MODEL_DIR"),
    ("q-missing-calibration", "quantize {fp} {ws}/q --calibration nosuch.txt", "--calibration"),
    ("q-seqlen-0", "quantize {fp} {ws}/q --calibration {calib} --seqlen 0", "--seqlen"),
    ("q-seqlen-too-long", "quantize {fp} {ws}/q --calibration {calib} --seqlen 100000", "max_position_embeddings"),
    ("q-ids-outside-vocab", "quantize {fp} {ws}/q --calibration {badids} --nsamples 2", "vocabulary"),
    ("q-bits-5", "quantize {fp} {ws}/q --calibration {calib} --bits 5", "--bits"),
    ("q-group-0", "quantize {fp} {ws}/q --calibration {calib} --group-size 0", "--group"),
    ("q-shard-size", "quantize {fp} {ws}/q --calibration {calib} --max-shard-size lots", "--max-shard-size"),
    ("q-no-calibration", "quantize {fp} {ws}/q", "--calibration"),
    ("q-calibration-no-kind", "quantize {fp} {ws}/q --calibration {nokind}", "nokind.jsonl:2: cannot tell the record"),
    ("q-calibration-mixed-kinds", "quantize {fp} {ws}/q --calibration {mixed}", "mixed.jsonl:2: looks like a cot"),
    # a bad --keep fails before the tokenizer, the calibration or any log (one line is all of stderr)
    ("q-keep-nonsense", "quantize {fp} {ws}/q --calibration {calib} --keep nonsense", "rule 'nonsense' matches no"),
    ("q-keep-bad-regex", "quantize {fp} {ws}/q --calibration {calib} --keep (", "--keep (: not a valid regex"),
    ("q-rule-nosuch", "quantize {fp} {ws}/q --calibration {calib} --keep ffn --rule nosuch=bits:8", "'nosuch'"),
    # merge
    ("m-out-is-run", "merge {run} --to fp16 --out {run} --overwrite", "is the input"),
    ("m-out-inside-run", "merge {run} --to fp16 --out {run}/merged", "inside the input"),
    ("m-out-holds-run", "merge {run} --to fp16 --out {ws} --overwrite", "holds"),
    ("m-out-file", "merge {run} --to fp16 --out {afile}", "is a file"),
    ("m-missing-run", "merge {ws}/nosuch --to fp16 --out {ws}/m", "RUN_DIR"),
    ("m-truncated-adapter", "merge {run_badadapter} --to fp16 --out {ws}/m", "truncated"),
    ("m-other-base", "merge {run_other} --to fp16 --out {ws}/m", "another base"),
    ("m-nsamples-0", "merge {run} --to gptq --out {ws}/m --nsamples 0", "--nsamples"),
    ("m-no-tokenizer", "merge {run_notok} --to gptq --bits 4 --group-size 32 --nsamples 2 --out {ws}/m",
     "tokenizer"),
    # export
    ("e-out-is-run", "export {run} --out {run} --overwrite", "is the input"),
    ("e-truncated-adapter", "export {run_badadapter} --out {ws}/e", "truncated"),
    ("e-other-base", "export {run_other} --out {ws}/e", "another base"),
    ("e-missing-run", "export nosuch/run --out {ws}/e", "RUN_DIR"),
    # chat
    ("c-truncated-adapter", "chat {run_badadapter}", "truncated"),
    ("c-no-tokenizer", "chat {run_notok}", "tokenizer"),
    ("c-template", "chat {run} --template nosuch", "--template"),
    ("c-max-new-tokens-0", "chat {run} --max-new-tokens 0", "--max-new-tokens"),
    ("c-top-p-0", "chat {run} --top-p 0", "--top-p"),
    ("c-missing-run", "chat {ws}/nosuch", "RUN_DIR"),
    ("c-missing-base", "chat --base org/model", "--base"),
    ("c-no-model", "chat", "RUN_DIR) or --base CHECKPOINT ("),
    ("c-missing-adapter", "chat --base {q4} --adapter {ws}/nope", "no such adapter folder"),
    # generate
    ("g-missing-prompts", "generate {run} --prompts nosuch.txt", "nosuch.txt"),
    ("g-truncated-adapter", "generate {run_badadapter} --prompts {prompts}", "truncated"),
    ("g-no-tokenizer", "generate {run_notok} --prompts {prompts}", "tokenizer"),
    ("g-batch-0", "generate {run} --prompts {prompts} --batch-size 0", "--batch-size"),
    ("g-temperature-negative", "generate {run} --prompts {prompts} --temperature -1", "--temperature"),
    ("g-missing-base", "generate --base {ws}/nosuch --prompts {prompts}", "--base"),
]
if NO_CUDA:
    CASES += [("ft-device-cuda", "finetune --quant_checkpoint {q4} --data {data} --device cuda", "--device"),
              ("g-device-cuda", "generate {run} --prompts {prompts} --device cuda", "--device"),
              ("q-device-cuda", "quantize {fp} {ws}/q --calibration {calib} --device cuda", "--device")]
MISSING_PATH = {"ft-missing-checkpoint", "ft-missing-base", "ft-readme-config", "ft-missing-data",
                "q-missing-model", "m-missing-run", "e-missing-run", "c-missing-run", "c-missing-base",
                "g-missing-base"}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Inputs of every kind, good and bad, and a working directory holding a user's files."""
    from gptqlora.checkpoint.config import QuantConfig
    from gptqlora.data.synthetic import string_records
    from gptqlora.quant.driver import quantize_model
    from runs import make_run
    from tiny import calibration_samples, save_tiny_llama

    ws = tmp_path_factory.mktemp("ws")
    fp = save_tiny_llama(ws / "fp")
    (ws / "data" / "dir").mkdir(parents=True)
    data = ws / "data" / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in string_records(16, seed=0)))
    run = make_run(fp, ws / "run", data=[str(data)])
    q2 = ws / "q2"
    quantize_model(fp, q2, QuantConfig(bits=2, group_size=32), calibration_samples(), device="cpu", progress=False)
    shutil.copytree(run / "base", ws / "q4")
    shutil.copytree(run / "base", ws / "qtrunc")
    _truncate(ws / "qtrunc" / "model.safetensors")
    shutil.copytree(run, ws / "run_badadapter")
    _truncate(ws / "run_badadapter" / "adapter" / "adapter_model.safetensors")
    shutil.copytree(run, ws / "run_notok")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ws / "run_notok" / f).unlink(missing_ok=True)
    other = make_run(save_tiny_llama(ws / "fp_other", hidden=64, intermediate=128), ws / "other", data=[str(data)])
    shutil.copytree(run, ws / "run_other")
    shutil.rmtree(ws / "run_other" / "adapter")
    shutil.copytree(other / "adapter", ws / "run_other" / "adapter")
    (ws / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (ws / "badids.jsonl").write_text(json.dumps({"input_ids": [5, 6, 100000, 7]}) + "\n")
    (ws / "nokind.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    (ws / "mixed.jsonl").write_text(json.dumps({"instruction": "i", "output": "o"}) + "\n"
                                    + json.dumps({"question": "q", "rationale": "r", "answer": "a"}) + "\n")
    (ws / "prompts.txt").write_text("Reverse the word: cat\n")
    (ws / "afile").write_text("not a folder\n")
    work = ws / "work"
    (work / "sub").mkdir(parents=True)
    (work / "my_script.py").write_text("print('mine')\n")
    shutil.copy(data, work / "train.jsonl")
    (work / "sub" / "notes.txt").write_text("mine too\n")
    return {"ws": ws, "work": work, "fp": fp, "q4": ws / "q4", "q2": q2, "qtrunc": ws / "qtrunc", "run": run,
            "run_badadapter": ws / "run_badadapter", "run_notok": ws / "run_notok", "run_other": ws / "run_other",
            "data": data, "datadir": ws / "data", "calib": ws / "calib.txt", "badids": ws / "badids.jsonl",
            "nokind": ws / "nokind.jsonl", "mixed": ws / "mixed.jsonl",
            "prompts": ws / "prompts.txt", "afile": ws / "afile", "repo": REPO}


@pytest.fixture(scope="module")
def results(workspace, tmp_path_factory):
    cases = [{"id": cid, "argv": line.format(**workspace).split(), "cwd": str(workspace["work"]),
              "watch": [str(workspace["ws"])]} for cid, line, _ in CASES]
    d = tmp_path_factory.mktemp("driver")
    (d / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "cli_driver.py"), str(d / "cases.json"),
                        str(d / "results.json")], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((d / "results.json").read_text())


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert {line.split()[0] for _, line, _ in CASES} == {"quantize", "finetune", "merge", "export", "chat",
                                                          "generate"}


@pytest.mark.parametrize("cid,line,word", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation(results, cid, line, word):
    r = results[cid]
    lines = [x for x in r["stderr"].splitlines() if x.strip()]
    assert r["rc"] == 2, r["stderr"][-2000:]
    assert "Traceback" not in r["stderr"]
    assert len(lines) == 1, lines  # one line, no usage block, no log or warning noise
    assert lines[0].startswith(f"gptqlora {line.split()[0]}: error: ") and word in lines[0], lines[0]
    assert r["changed"] == [], r["changed"]  # inputs and the working directory untouched
    if cid in MISSING_PATH:
        assert r["seconds"] < 2.0, f"a missing path took {r['seconds']:.1f}s to fail"


@pytest.mark.parametrize("argv", [["quantize", "models/llama-7b", "out", "--calibration", "c.txt"],
                                  ["finetune", "--quant_checkpoint", "models/llama-7b-2bit"],
                                  ["finetune", "--data=a.jsonl,b.jsonl"], ["merge", "runs/nosuch", "--out", "m"],
                                  ["chat", "--base", "org/model"], ["generate", "runs/x", "--prompts", "p.txt"]])
def test_a_missing_path_fails_before_torch_is_imported(tmp_path, argv):
    """A cold start too: the path is checked before the command's modules (torch, transformers) load."""
    code = ("import sys, time; t = time.perf_counter(); from gptqlora.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, round(time.perf_counter() - t, 2))")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    rc, torch_loaded, seconds = r.stdout.split()
    assert rc == "2" and torch_loaded == "False", (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "no such" in r.stderr
    assert float(seconds) < 2.0
