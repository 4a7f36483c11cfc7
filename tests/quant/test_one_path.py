"""One quantization path: every quantize option reaches the solver, the same way, from all three entry points
(`gptqlora quantize`, `finetune --base_model`, `merge --to gptq`)."""

import json

import pytest
import torch

import gptqlora.quant.api as api
from gptqlora.checkpoint.config import QuantConfig
from gptqlora.cli import main
from gptqlora.data.calibration import load_calibration
from gptqlora.quant.api import QuantizeOptions
from gptqlora.quant.solvers import SOLVERS
from tiny import char_tokenizer

# every option away from its default
OPTIONS = ["--bits", "3", "--group-size", "64", "--desc-act", "--asym", "--static-groups", "--damp", "0.1",
           "--no-mse", "--mse-select", "--gptaq", "0.5", "--refit-scales", "--refit-rounds", "2", "--descent-passes", "1", "--no-act-group-aware", "--format", "gptq_v2", "--no-true-sequential", "--nsamples", "3", "--seqlen", "40",
           "--calibration-seed", "5", "--dtype", "bfloat16"]
WANT = QuantConfig(bits=3, group_size=64, desc_act=True, sym=False, format="gptq_v2", static_groups=True,
                   true_sequential=False, damp_percent=0.1, mse=False, act_group_aware=False,
                   mse_select=True, gptaq=0.5, refit_scales=True, refit_rounds=2,
                   descent_passes=1)
WANT_SOLVER = {"bits": 3, "group_size": 64, "sym": False, "desc_act": True, "static_groups": True, "damp": 0.1,
               "mse": False, "min_zero": 0, "group_aware": False}


class Stop(Exception):
    """Raised by the spy solver: what reached it is recorded, the rest of the run is not needed."""


@pytest.fixture
def seen(monkeypatch):
    """Record what the driver receives and what each solver is asked, then stop at the first solve."""
    rec = {"made": 0}
    for name, real in list(SOLVERS.items()):
        class Spy(real):
            def __init__(self, weight, _name=name):
                super().__init__(weight)
                rec["made"] += 1
                rec["method"] = _name

            def quantize(self, **kw):
                rec["solver"] = kw
                rec["made_before_first_solve"] = rec["made"]
                raise Stop

        monkeypatch.setitem(SOLVERS, name, Spy)
    driver = api.quantize_model

    def recording(model_dir, out_dir, qcfg, samples, **kw):
        rec.update(qcfg=qcfg, samples=samples, dtype=kw["dtype"], driver_method=kw["method"])
        return driver(model_dir, out_dir, qcfg, samples, **kw)

    monkeypatch.setattr(api, "quantize_model", recording)
    return rec


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"calibration text number {i}, quick brown fox"}) for i in range(40)))
    return p


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from gptqlora.data.synthetic import string_records

    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in string_records(16, seed=0)))
    return p


def entry_point(which, tiny_dir, tiny_run, data_file, tmp_path):
    out = str(tmp_path / "out")
    return {"quantize": ["quantize", str(tiny_dir), out],
            "finetune": ["finetune", "--base_model", str(tiny_dir), "--data", str(data_file), "--output_dir", out],
            "merge": ["merge", str(tiny_run), "--to", "gptq", "--out", out]}[which]


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("which", ["quantize", "finetune", "merge"])
def test_every_option_reaches_the_solver(which, method, seen, calib, tiny_dir, tiny_run, data_file, tmp_path):
    argv = entry_point(which, tiny_dir, tiny_run, data_file, tmp_path)
    with pytest.raises(Stop):
        main([*argv, *OPTIONS, "--method", method, "--calibration", str(calib)])
    assert seen["qcfg"] == WANT  # bits, group size, act-order, sym, format, static groups, damp, mse, sequential
    assert seen["method"] == seen["driver_method"] == method and seen["dtype"] == torch.bfloat16
    # the GPTQ-only options reach GPTQ only
    assert seen["solver"] == (WANT_SOLVER | {"mse_select": True, "gptaq": 0.5, "refit": True, "refit_rounds": 2,
                                       "descent_passes": 1} if method == "gptq" else WANT_SOLVER)
    assert seen["made_before_first_solve"] == 7  # --no-true-sequential: all of a block's linears at once
    want = load_calibration(calib, char_tokenizer(), nsamples=3, seqlen=40, seed=5)
    assert len(seen["samples"]) == 3 and all(torch.equal(a, b) for a, b in zip(seen["samples"], want))
    assert not (tmp_path / "out").exists() or which == "finetune"  # nothing half-written (finetune: the run)


@pytest.mark.parametrize("which", ["quantize", "merge"])
def test_defaults_are_defined_once(which, seen, calib, tiny_dir, tiny_run, data_file, tmp_path):
    with pytest.raises(Stop):
        main([*entry_point(which, tiny_dir, tiny_run, data_file, tmp_path), "--calibration", str(calib)])
    d = QuantizeOptions()
    assert seen["qcfg"] == QuantConfig() and seen["method"] == d.method and seen["dtype"] == torch.float16
    from transformers import AutoConfig

    # the default sample length, lowered to the model's context (512 positions here) with a log line
    seqlen = min(api.FILE_SEQLEN, AutoConfig.from_pretrained(tiny_dir).max_position_embeddings)
    want = load_calibration(calib, char_tokenizer(), d.nsamples, seqlen, d.calibration_seed)
    assert len(seen["samples"]) == len(want) and all(torch.equal(a, b) for a, b in zip(seen["samples"], want))
    assert seen["solver"]["bits"] == QuantConfig().bits and seen["made_before_first_solve"] == 3  # q, k, v first
