"""scripts/spqr_vs_gptq.py end to end on the tiny model: both quantizations, perplexities, GPTQ-LoRA trained
on the SpQR base and merged to fp16 (the real-text run is the same command on a real model)."""

import importlib.util
import json
from pathlib import Path

from gptqlora.data.synthetic import string_records

SCRIPT = Path(__file__).parents[1] / "scripts" / "spqr_vs_gptq.py"


def test_spqr_vs_gptq_script(tiny_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("spqr_vs_gptq", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) for i in range(30)))
    (tmp_path / "eval.txt").write_text("a lazy dog sleeps while the quick brown fox jumps. " * 8)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in string_records(8, seed=0)))
    rc = mod.main([str(tiny_dir), "--calibration", str(calib), "--eval", str(tmp_path / "eval.txt"), "--out",
                   str(tmp_path / "out"), "--nsamples", "2", "--seqlen", "32", "--windows", "3", "--train-data",
                   str(data), "--max-steps", "2", "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = res["rows"]
    assert set(rows) == {"fp16", "gptq", "spqr", "spqr+lora merged"}
    assert rows["spqr"]["avg_bits"] <= 4.0 and res["spqr_avg_bits_le_4"]
    assert rows["gptq"]["avg_bits"] > 4.0 and all(v["ppl"] > 1 for v in rows.values())
    assert "| spqr |" in capsys.readouterr().out
