"""The one-token decode kernel (kernels/gemv1.py) against float64 and against gemv.py's kernel: 2/4/8 bit,
plain and act-order (repacked) rows, packed and float zeros, fp32/fp16/bf16, with and without LoRA, split-K,
N not a multiple of the column block; and which calls it takes."""

import pytest
import torch

from gptqlora.kernels import gemv, gemv1
from gptqlora.kernels.gemv import gemv_reference, gemv_triton, plan_gemv
from gptqlora.formats.gptq import pack_cols, pack_rows
from gptqlora.kernels.reference import dequantize
from packed import random_packed
from test_gemv import DEVICE, TOL, case, rel_err


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("layout", [(False, False), (True, False), (True, True)], ids=["plain", "act-order", "float-zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_matches_float64_and_the_other_kernel(bits, layout, dtype, monkeypatch):
    group = {2: 32, 4: 64, 8: -1}[bits]
    lora = layout != (True, True)
    p, x, a, b, want = case(256, 80, bits, group, *layout, 1, dtype, seed=bits + 7 * layout[0], lora=lora)
    args = p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits
    plan = plan_gemv(p["qweight"], p["g_idx"], bits, group, True)
    assert gemv1.takes(1, 256, bits, plan, False)
    for cfg in (None, {"BW": 2, "BN": 32, "SPLIT": 3, "num_warps": 1}):  # N = 80: a partial column block
        y = gemv_triton(x, *args, plan, a, b, 2.0, config=cfg)
        assert y.dtype == dtype and y.shape == (1, 80)
        assert rel_err(y, want) < TOL[dtype]
        assert not plan.locks.any()  # the split-K counters are back at zero
    monkeypatch.setenv("GPTQLORA_GEMV1", "0")  # gemv.py's kernel on the same call
    assert not gemv1.takes(1, 256, bits, plan, False)
    other = gemv_triton(x, *args, plan, a, b, 2.0)
    assert rel_err(y, other.double()) < TOL[dtype]
    assert rel_err(y, gemv_reference(x, *args, a, b, 2.0).double()) < TOL[dtype]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_exact_enough_where_the_offsets_cancel_most(bits):
    """The kernel sums (m + q) x and subtracts Σ m x once per tile. The cancellation is largest for small codes
    and x of one sign; y must still be close to float64: 1e-6 with fp32 x (WIN 0), and at 16-bit x equal
    to the float64 result within one rounding of y (a whole bf16 step: Triton's interpreter truncates to
    bf16, where the GPU rounds to nearest)."""
    k, n = 1024, 32
    codes = torch.ones(k, n, dtype=torch.int32)
    codes[::7] = 2**bits - 1
    zeros = torch.zeros(k // 128, n, dtype=torch.int32)
    scales = torch.full((k // 128, n), 0.01).half()
    g_idx = torch.arange(k, dtype=torch.int32) // 128
    qw, qz = pack_rows(codes, bits).to(DEVICE), pack_cols(zeros, bits).to(DEVICE)
    scales, g_idx = scales.to(DEVICE), g_idx.to(DEVICE)
    plan = plan_gemv(qw, g_idx, bits, 128)
    w = dequantize(qw, qz, scales, g_idx, bits, torch.float64)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2**-11), (torch.bfloat16, 2**-7)):
        x = (torch.rand(1, k, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(bits)) * 4 + 1).to(dtype)
        want = x.double() @ w
        y = gemv_triton(x, qw, qz, scales, g_idx, bits, plan).double()
        assert float(((y - want).abs() / want.abs()).max()) < tol, dtype


def test_takes_one_token_whole_words_and_sorted_rows_only(monkeypatch):
    p = random_packed(256, 64, 4, 64, True, False, 0, DEVICE)
    sorted_plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64, True)
    gather_plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64, False)
    assert gemv1.takes(1, 256, 4, sorted_plan, False)
    assert not gemv1.takes(2, 256, 4, sorted_plan, False)  # M > 1: gemv.py's tensor-core path
    assert not gemv1.takes(1, 256, 4, gather_plan, False)  # act-order without the repacked copy
    assert not gemv1.takes(1, 256, 4, sorted_plan, True)  # SpQR's dense part
    p3 = random_packed(256, 64, 3, 64, False, False, 0, DEVICE)
    assert not gemv1.takes(1, 256, 3, plan_gemv(p3["qweight"], p3["g_idx"], 3, 64), False)  # words straddle
    odd = random_packed(288, 64, 4, 96, False, False, 0, DEVICE)  # 96-row groups: tiles of 32 rows still fit
    odd_plan = plan_gemv(odd["qweight"], odd["g_idx"], 4, 96)
    assert gemv1.tile_words(288, 4, odd_plan, 8) == 4
    monkeypatch.setenv("GPTQLORA_GEMV1", "0")
    assert not gemv1.takes(1, 256, 4, sorted_plan, False)


@pytest.mark.parametrize("k, n, group", [(160, 32, 64), (288, 48, 96), (192, 40, -1)])
def test_odd_groups_and_legal_configs(k, n, group):
    """A last group shorter than the others, a group of 96 rows, one group per channel: BW is cut to a tile
    that lies in one group, SPLIT to one that leaves every split rows, and y is right."""
    p, x, a, b, want = case(k, n, 4, group, group != -1, False, 1, torch.float32, seed=k)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, group)
    cfg = gemv1.legal_config({"BW": 16, "BN": 16, "SPLIT": 40, "num_warps": 1}, k, 4, plan)
    assert cfg["BW"] * 8 <= (group if group > 0 else k) and k % (cfg["BW"] * 8) == 0
    assert cfg["SPLIT"] <= k // (8 * cfg["BW"])
    y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 2.0, config=cfg)
    assert rel_err(y, want) < 1e-5
    assert not plan.locks.any()


def test_tuned_entry_with_bw_is_this_kernels(tmp_path, monkeypatch):
    """A table entry for a one-token key that carries BW configures this kernel; one without BW (gemv.py's
    tiles) leaves this kernel on its heuristic."""
    import json

    p, x, a, b, want = case(256, 64, 4, 64, False, False, 1, torch.float32, seed=3)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64)
    path = tmp_path / "configs.json"
    monkeypatch.setenv(gemv.TUNED_ENV, str(path))
    for entry, want_bw in (({"BW": 2, "BN": 32, "SPLIT": 4, "num_warps": 2}, 2),
                           ({"BN": 64, "BK": 64, "SPLIT": 2, "num_warps": 2}, gemv1.heuristic_config(256, 64, 4, plan)["BW"])):
        path.write_text(json.dumps({"configs": {gemv.tuned_key(4, 1, 256, 64, True): entry}}))
        monkeypatch.setattr(gemv, "_CONFIGS", {})
        gemv.tuned_table.cache_clear()
        try:
            assert gemv.pick_config1(256, 64, 4, plan)["BW"] == want_bw
            y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 2.0)
            assert rel_err(y, want) < 1e-5
        finally:
            gemv.tuned_table.cache_clear()


def test_lora_rank_not_a_power_of_two():
    """B is read one rank at a time up to R rounded up to a power of two; the ranks past R are masked."""
    p = random_packed(256, 48, 4, 64, True, False, 5, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(1, 256, device=DEVICE, generator=g)
    a = torch.randn(5, 256, device=DEVICE, generator=g) * 0.1
    b = torch.randn(48, 5, device=DEVICE, generator=g) * 0.1
    want = x.double() @ p["w64"].to(DEVICE) + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64)
    y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 0.5)
    assert rel_err(y, want) < 1e-5
