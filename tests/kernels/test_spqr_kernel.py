"""SpQR's dense+sparse path: the vectorised stat unpacking, outliers added at their places, the GPU
benchmark's CPU smoke mode."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gptqlora.formats.gptq import pack_cols, pack_rows, unpack_cols
from gptqlora.formats.spqr import csr_from_mask, pack_stats
from gptqlora.kernels.dequant import plan_for
from gptqlora.kernels.spqr import SpQRTensors, spqr_stats, spqr_weight, unpack_along_n
from gptqlora.kernels.spqr_triton import spqr_small_m, spqr_stats_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_spqr(k=128, n=64, bits=3, group=16, stat_bits=3, stat_group=16, act_order=True, frac=0.03, seed=0):
    """Random SpQR tensors (no solver): codes, 3-bit statistics with fp16 step/base, a few outliers (rows
    without any included)."""
    g = torch.Generator().manual_seed(seed)
    ng = k // group
    codes = torch.randint(0, 2**bits, (k, n), generator=g, dtype=torch.int32)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    stats = {}
    for name, lo, hi in (("scales", 1e-3, 2e-2), ("zeros", -0.5, 2**bits - 0.5)):
        stats[name + "_code"] = pack_stats(torch.randint(0, 2**stat_bits, (ng, n), generator=g, dtype=torch.int32),
                                           stat_bits)
        stats[name + "_step"] = (torch.rand(ng, n // stat_group, generator=g) * (hi - lo) / 2**stat_bits).half()
        stats[name + "_base"] = (lo + torch.rand(ng, n // stat_group, generator=g) * (hi - lo) / 2).half()
    mask = torch.rand(n, k, generator=g) < frac
    mask[5] = False  # an output channel without outliers
    v, c, r = csr_from_mask(mask, torch.randn(n, k, generator=g) * 0.3)
    t = SpQRTensors(qweight=pack_rows(codes, bits), g_idx=g_idx, **stats, outlier_values=v, outlier_cols=c,
                    outlier_rows=r)
    return SpQRTensors(*(x.to(DEVICE) for x in t.as_tuple()))


def without_outliers(t: SpQRTensors) -> SpQRTensors:
    return SpQRTensors(*t.as_tuple()[:8], t.outlier_values[:0], t.outlier_cols[:0], torch.zeros_like(t.outlier_rows))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dense_weight_equals_the_torch_reference_bit_for_bit(bits, act_order, dtype):
    """Statistics decoded inside the dequant kernel (grouped, and the per-row gather) and the CSR outlier add
    give exactly the torch path's W."""
    t = random_spqr(bits=bits, act_order=act_order, seed=bits + 2 * act_order)
    want = spqr_weight(t, bits, 3, dtype, "torch")
    plan = plan_for(t.g_idx, 16)
    interp_bf16 = dtype == torch.bfloat16 and DEVICE == "cpu"  # Triton's interpreter truncates to bf16
    if interp_bf16:
        exact = spqr_weight(t, bits, 3, torch.float32, "torch")
        truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
        dense = spqr_weight(without_outliers(t), bits, 3, torch.float32, "torch")
        outl = dense != exact  # where an outlier was added
        assert outl.sum() > 100
    for p in (plan, None):
        got = spqr_weight(t, bits, 3, dtype, "triton", p)
        assert got.dtype == dtype
        if interp_bf16:  # dense values rounded or truncated once; outliers: dense and value each rounded, summed
            assert bool(((got == want) | (got == truncated))[~outl].all())
            err = (got.float() - want.float()).abs()[outl]
            assert bool((err <= (dense.abs() + (exact - dense).abs())[outl] * 2**-6).all())
        else:
            assert torch.equal(got, want), (p, (got.float() - want.float()).abs().max())


def test_statistics_kernel_equals_torch():
    t = random_spqr(n=96, stat_group=32)
    for got, want in zip(spqr_stats_triton(t, 3), spqr_stats(t, 3)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_outlier_add_is_where_the_torch_path_puts_it():
    t = random_spqr(frac=0.0)  # no outliers at all: the dense part alone
    assert t.outlier_values.numel() == 0
    assert torch.equal(spqr_weight(t, 3, 3, torch.float32, "triton", plan_for(t.g_idx, 16)),
                       spqr_weight(t, 3, 3, torch.float32, "torch"))


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, repack", [(3, True), (4, True), (3, False)], ids=["3bit", "4bit", "3bit-gather"])
def test_small_m_path_matches_the_dense_weight(m, dtype, bits, repack):
    """Decode: the small-M GPTQ kernel on the codes, decoding the statistics per tile (act-order's repacked
    copy; or per row, gathered), plus the CSR SpMV, against x @ W (the torch path's W, in float64)."""
    from gptqlora.kernels.gemv import plan_gemv

    t = random_spqr(k=256, n=96, bits=bits, seed=m)
    w = spqr_weight(t, bits, 3, torch.float64 if DEVICE == "cpu" else torch.float32, "torch").double()
    x = torch.randn(m, 256, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(m)).to(dtype)
    plan = plan_gemv(t.qweight, t.g_idx, bits, 16, repack)
    assert plan.sorted == repack
    y = spqr_small_m(x, t, bits, 3, plan)
    want = x.double() @ w
    err = float((y.double() - want).norm() / want.norm())
    assert y.dtype == dtype and err < (1e-5 if dtype == torch.float32 else 1e-2), err
    y0 = spqr_small_m(x, without_outliers(t), bits, 3, plan)
    assert float((y0.double() - want).norm() / want.norm()) > 10 * err  # the outliers are really added


@pytest.mark.parametrize("m, repack", [(1, True), (5, True), (3, False)], ids=["m1", "m5", "m3-gather"])
def test_small_m_path_fuses_the_lora_update(m, repack):
    """An adapter in the same launch: x @ W + s * (x @ Aᵀ) @ Bᵀ (the chat/generate decode step of a SpQR base)."""
    from gptqlora.kernels.gemv import plan_gemv

    t = random_spqr(k=256, n=96, seed=10 + m)
    g = torch.Generator(device=DEVICE).manual_seed(m)
    x = torch.randn(m, 256, device=DEVICE, generator=g)
    a = torch.randn(8, 256, device=DEVICE, generator=g) * 0.1  # (r, K)
    b = torch.randn(96, 8, device=DEVICE, generator=g) * 0.1  # (N, r)
    plan = plan_gemv(t.qweight, t.g_idx, 3, 16, repack)
    w = spqr_weight(t, 3, 3, torch.float64 if DEVICE == "cpu" else torch.float32, "torch").double()
    want = x.double() @ w + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    y = spqr_small_m(x, t, 3, 3, plan, a, b, 0.5)
    err = float((y.double() - want).norm() / want.norm())
    assert err < 1e-5, err
    lora = 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    assert float((spqr_small_m(x, t, 3, 3, plan).double() - want).norm()) > 100 * err * float(lora.norm())


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
