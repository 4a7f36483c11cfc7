"""gptqlora's default GPTQ against GPTQModel 7.7's on the same small real-text model and calibration
(bench/assets/manpage-llama, built by scripts/train_text_llama.py): 2 bit, group 64, act-order; held-out
log-perplexity gap over the fp model, both checkpoints read by the same loader. Measured (docs/results.md):
ours 0.50x GPTQModel's default, 1.18x GPTQModel's with mse=2.4. Slow (three quantizations, ~1-3 min)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402

gptqmodel = pytest.importorskip("gptqmodel")
BENCH = Path(__file__).parents[2] / "bench"
sys.path.append(str(BENCH))

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # GPTQModel.quantize writes ./logs/*.log into the working directory


def test_default_gptq_gap_is_at_most_0_7x_gptqmodels(tmp_path):
    from quality_models import MANPAGE_DIR, fp_perplexity, manpage_spec, quantized_perplexity
    from quantizer_compare import ours, theirs

    if not (MANPAGE_DIR / "config.json").is_file():
        pytest.skip("bench/assets/manpage-llama is missing (scripts/train_text_llama.py builds it)")
    spec = manpage_spec(64)
    fp = fp_perplexity(spec)["nll"]
    gap = {}
    for name, fn, overrides in (("ours", ours, {}), ("gm", theirs, {}), ("gm_mse", theirs, {"mse": 2.4})):
        fn(spec, tmp_path / name, 2, 64, True, overrides)
        gap[name] = quantized_perplexity(tmp_path / name, spec)["nll"] - fp
    assert gap["ours"] <= 0.7 * gap["gm"]
    assert gap["ours"] <= 1.25 * gap["gm_mse"]  # measured 1.18: behind GPTQModel's mse by a little (results.md)
