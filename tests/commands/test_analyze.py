"""`gptqlora analyze` on the built-in tiny model: the JSON and both PNGs, its errors reused by --keep crucial."""

import json

import pytest

from gptqlora.cli import main
from gptqlora.data.assets import tiny_model_dir
from gptqlora.quant.precision import crucial_types, read_errors


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    records = [json.loads(line) for line in (tiny_model_dir().parent / "data" / "alpaca_synth.jsonl").open()][:60]
    f.write_text("\n\n".join(f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in records))
    return f


@pytest.fixture(scope="module")
def analysis(calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "a"
    assert main(["analyze", str(tiny_model_dir()), "--calibration", str(calib), "--out", str(out), "--nsamples", "4",
                 "--seqlen", "128", "--bits", "2,4"]) == 0
    return out


def test_analyze_writes_json_and_plots(analysis, capsys):
    data = json.loads((analysis / "analysis.json").read_text())
    assert data["bits"] == [2, 4] and data["layers"] == 4
    e2, e4 = data["rel_error"]["2"], data["rel_error"]["4"]
    assert len(e2) == 4 * 7 and set(e2) == set(data["gptq_error"]["4"])
    assert sum(e2.values()) > 4 * sum(e4.values())  # 2 bit hurts far more than 4 bit
    act = data["activation_outliers"]
    assert act["threshold"] == 6.0
    # q/k/v read one tensor, gate/up another: four input sites per block
    assert act["shared_inputs"] == {"mlp.up_proj": "mlp.gate_proj", "self_attn.k_proj": "self_attn.q_proj",
                                    "self_attn.v_proj": "self_attn.q_proj"}
    assert set(act["sites"]) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    for site in act["sites"].values():
        assert len(site["per_layer"]) == 4
        for entry in site["per_layer"]:
            assert (entry["max_abs"] > 6.0) == bool(entry["dims"])
    for png in ("gptq_error.png", "activation_outliers.png"):
        head = (analysis / png).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and (analysis / png).stat().st_size > 20_000


def test_crucial_reads_the_analysis(analysis):
    errors = read_errors(analysis / "analysis.json")
    assert len(errors) == 28
    assert len(crucial_types(errors)) == 2


def test_bad_analyze_input(calib, tmp_path, capsys):
    rc = main(["analyze", str(tiny_model_dir()), "--calibration", str(calib), "--out", str(tmp_path / "a"),
               "--bits", "2,5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--bits" in err and "Traceback" not in err and not (tmp_path / "a").exists()
