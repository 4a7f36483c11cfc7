"""gptqlora's default GPTQ (with GPTAQ) against GPTQModel 7.7's on the same small real-text model and
calibration (bench/assets/manpage-llama, built by scripts/train_text_llama.py): group 64, act-order, 2 and
3 bit; held-out log-perplexity gap over the fp model, both checkpoints read by the same loader. Measured on
this calibration (seed 0, docs/results.md), before the scale refit became a default (session 16): 2 bit 0.33x
GPTQModel's default gap and 0.78x its mse=2.4 gap; 3 bit 0.55x its default; with the refit (session 14's
runs): 2 bit 0.38x and 0.89x, 3 bit 0.34x; with the coordinate descent on the codes (the default since; this seed is
its worst at 3 bit, docs/results.md): 2 bit 0.38x and 0.90x, 3 bit 0.64x. The previous default (no GPTAQ) fails the
3-bit and the mse relation (1.20x, 1.18x). Slow (five quantizations, ~2-4 min)."""

import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("gptqmodel"):  # its venv only: set at import, this would turn torch.compile
    # off for every later test of the main suite (which collects this file and skips it)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # GPTQModel's TorchLinear would torch.compile (30 s)

import pytest  # noqa: E402

gptqmodel = pytest.importorskip("gptqmodel")
BENCH = Path(__file__).parents[2] / "bench"
sys.path.append(str(BENCH))

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # GPTQModel.quantize writes ./logs/*.log into the working directory


@pytest.fixture(scope="module")
def spec():
    from quality_models import MANPAGE_DIR, fp_perplexity, manpage_spec

    if not (MANPAGE_DIR / "config.json").is_file():
        pytest.skip("bench/assets/manpage-llama is missing (scripts/train_text_llama.py builds it)")
    s = manpage_spec(64)
    return s, fp_perplexity(s)["nll"]


def gaps(spec, tmp_path, bits, which):
    from quality_models import quantized_perplexity
    from quantizer_compare import ours, theirs

    s, fp = spec
    out = {}
    for name, fn, overrides in (("ours", ours, {}), ("gm", theirs, {}), ("gm_mse", theirs, {"mse": 2.4})):
        if name in which:
            fn(s, tmp_path / name, bits, 64, True, overrides)
            out[name] = quantized_perplexity(tmp_path / name, s)["nll"] - fp
    return out


def test_default_gptq_2bit_gap_is_at_most_0_7x_gptqmodels_and_below_its_mse(spec, tmp_path):
    gap = gaps(spec, tmp_path, 2, ("ours", "gm", "gm_mse"))
    assert gap["ours"] <= 0.7 * gap["gm"]
    assert gap["ours"] <= gap["gm_mse"]


def test_default_gptq_3bit_gap_is_at_most_0_7x_gptqmodels(spec, tmp_path):
    gap = gaps(spec, tmp_path, 3, ("ours", "gm"))
    assert gap["ours"] <= 0.7 * gap["gm"]
