"""SpQR's dense+sparse path: the vectorised stat unpacking, outliers added at their places, the GPU
benchmark's CPU smoke mode."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gptqlora.formats.gptq import pack_cols, unpack_cols
from gptqlora.formats.spqr import csr_from_mask
from gptqlora.kernels.spqr import SpQRTensors, spqr_weight, unpack_along_n


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_along_n_matches_unpack_cols(bits):
    codes = torch.randint(0, 2**bits, (7, 96))
    packed = pack_cols(codes, bits)
    assert torch.equal(unpack_along_n(packed, bits, 96), unpack_cols(packed, bits))


def test_outliers_land_at_their_places():
    k, n = 32, 32
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[3, 5] = mask[3, 30] = mask[31, 0] = True
    vals = torch.zeros(n, k)
    vals[3, 5], vals[3, 30], vals[31, 0] = 1.5, -2.0, 4.0
    v, c, r = csr_from_mask(mask, vals)
    zeros_code = pack_cols(torch.zeros(1, n, dtype=torch.int32), 3)
    t = SpQRTensors(qweight=torch.zeros(k * 3 // 32, n, dtype=torch.int32), g_idx=torch.zeros(k, dtype=torch.int32),
                    scales_code=zeros_code, scales_step=torch.zeros(1, 2).half(), scales_base=torch.ones(1, 2).half(),
                    zeros_code=zeros_code, zeros_step=torch.zeros(1, 2).half(), zeros_base=torch.zeros(1, 2).half(),
                    outlier_values=v, outlier_cols=c, outlier_rows=r)
    w = spqr_weight(t, 3, 3, torch.float32, "torch")  # (K, N): the codes are all 0 with zero 0, so W = outliers
    assert torch.equal(w, vals.t())


def test_benchmark_smoke_mode(tmp_path, capsys):
    path = Path(__file__).parents[2] / "bench" / "spqr.py"
    spec = importlib.util.spec_from_file_location("bench_spqr", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--reps", "1", "--tokens", "16", "--json", str(tmp_path / "b.json")]) == 0
    rows = {r["kind"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert set(rows) == {"bf16", "gptq3", "gptq4", "spqr3"} and rows["spqr3"]["avg_bits"] == 3.945
    assert "SpQR train tokens/s / GPTQ 3-bit" in capsys.readouterr().out
