"""GPTQ vs RTN on the layers of a tiny random LLaMA, with the inputs those layers really see."""

import pytest
import torch

from gptqlora.quant.gptq import GPTQ
from gptqlora.quant.quantizer import find_params, rtn
from tiny import calibration_samples, tiny_llama


@pytest.fixture(scope="module")
def layer_and_inputs():
    model = tiny_llama(layers=1, hidden=128, intermediate=256)
    lin = model.model.layers[0].mlp.down_proj  # K = 256
    seen = []
    h = lin.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for s in calibration_samples(16, 64):
            model(s)
    h.remove()
    return lin.weight.detach().clone(), torch.cat(seen)


def output_error(w, x, res):
    return float((x @ w.t() - x @ res.dequantize().t()).pow(2).mean())


def gptq(w, x, bits, **kw):
    g = GPTQ(w)
    for chunk in x.split(256):
        g.add_batch(chunk)
    return g.quantize(bits, **kw)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn(layer_and_inputs, bits):
    w, x = layer_and_inputs
    assert output_error(w, x, gptq(w, x, bits, group_size=64)) < output_error(w, x, rtn(w, bits, 64))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_act_order_and_small_groups_do_not_lose(layer_and_inputs, bits):
    w, x = layer_and_inputs
    plain = output_error(w, x, gptq(w, x, bits, group_size=128))
    fancy = output_error(w, x, gptq(w, x, bits, group_size=32, desc_act=True))
    assert fancy <= plain * 1.01


def test_act_order_g_idx_and_static_groups(layer_and_inputs):
    w, x = layer_and_inputs
    res = gptq(w, x, 4, group_size=32, desc_act=True)
    assert res.scales.shape == (8, 128) and sorted(res.g_idx.bincount().tolist()) == [32] * 8
    assert not torch.equal(res.g_idx, torch.arange(256) // 32)  # groups follow the Hessian order
    static = gptq(w, x, 4, group_size=32, desc_act=True, static_groups=True)
    assert torch.equal(static.g_idx, (torch.arange(256) // 32).int())


@pytest.mark.parametrize("group_size", [-1, 100])
def test_odd_group_sizes_and_asym(layer_and_inputs, group_size):
    w, x = layer_and_inputs
    res = gptq(w, x, 3, group_size=group_size, sym=False)
    assert res.scales.shape[0] == (1 if group_size == -1 else 3)
    assert res.codes.min() >= 0 and res.codes.max() <= 7
    assert output_error(w, x, res) < output_error(w, x, rtn(w, 3, group_size, sym=False))


def test_dead_columns_and_auto_damping():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    x = torch.randn(8, 64)  # rank 8: H is singular
    x[:, 5] = 0  # a dead input channel
    g = GPTQ(w)
    g.add_batch(x)
    res = g.quantize(4, group_size=32, damp=0.0)
    assert torch.isfinite(res.dequantize()).all()
    assert torch.all(res.dequantize()[:, 5] == 0)


def test_mse_search_lowers_weight_error():
    torch.manual_seed(0)
    w = torch.randn(32, 64) ** 3  # heavy tails: the full range wastes levels on a few weights
    plain, clipped = rtn(w, 3, 64), rtn(w, 3, 64, mse=True)
    assert clipped.error < plain.error


def test_min_zero_keeps_v1_storable():
    w = torch.rand(16, 32) + 0.5  # all positive: asymmetric zero would be 0
    assert find_params(w, 4, sym=False)[1].min() == 0
    assert find_params(w, 4, sym=False, min_zero=1)[1].min() == 1


def _uneven_inputs(x: torch.Tensor) -> torch.Tensor:
    """The calibration inputs with a few channels far larger than the rest, as in real LLM activations."""
    scale = torch.ones(x.shape[1])
    scale[torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))[:24]] = 8.0
    return x * scale


def test_group_aware_order_keeps_g_idx_trivial_and_beats_plain_order(layer_and_inputs):
    w, x = layer_and_inputs
    x = _uneven_inputs(x)
    plain = gptq(w, x, 2, group_size=32)
    gar = gptq(w, x, 2, group_size=32, group_aware=True)
    assert torch.equal(gar.g_idx, torch.arange(w.shape[1], dtype=torch.int32) // 32)  # every loader reads it
    assert output_error(w, x, gar) < output_error(w, x, plain)


def test_group_aware_order_is_ignored_with_desc_act_and_per_channel(layer_and_inputs):
    w, x = layer_and_inputs
    for kw in ({"desc_act": True, "group_size": 32}, {"group_size": -1}):
        a, b = gptq(w, x, 3, **kw), gptq(w, x, 3, group_aware=True, **kw)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.g_idx, b.g_idx)


@pytest.mark.parametrize("bits", [2, 3])
def test_mse_select_keeps_the_lower_output_error(layer_and_inputs, bits):
    w, x = layer_and_inputs
    errs = [output_error(w, x, gptq(w, x, bits, group_size=64, desc_act=True, mse=m)) for m in (True, False)]
    assert errs[0] != errs[1]  # the two candidates differ, so the choice is real
    chosen = output_error(w, x, gptq(w, x, bits, group_size=64, desc_act=True, mse=True, mse_select=True))
    assert chosen == pytest.approx(min(errs), rel=1e-5)


def asym_gptq(w, x, x_fp, alpha, **kw):
    g = GPTQ(w)
    for a, b in zip(x.split(256), x_fp.split(256)):
        g.add_batch(a, b)
    return g.quantize(2, group_size=64, gptaq=alpha, **kw)


def test_gptaq_targets_the_fp_output(layer_and_inputs):
    """The quantized layer sees perturbed inputs x (an earlier layer's quantization error); asymmetric
    calibration makes Q x closer to the fp layer's W x_fp, and with x == x_fp it is plain GPTQ."""
    w, x_fp = layer_and_inputs
    gen = torch.Generator().manual_seed(0)
    x = x_fp + 0.3 * x_fp.std() * torch.randn(x_fp.shape, generator=gen) @ torch.randn(256, 256, generator=gen) / 16

    def fp_error(res):
        return float((x_fp @ w.t() - x @ res.dequantize().t()).pow(2).mean())

    plain, asym = fp_error(asym_gptq(w, x, x_fp, 0.0)), fp_error(asym_gptq(w, x, x_fp, 1.0))
    assert asym < 0.9 * plain
    same = asym_gptq(w, x_fp, x_fp, 1.0)
    assert torch.equal(same.codes, gptq(w, x_fp, 2, group_size=64).codes)


@pytest.mark.parametrize("bits, desc_act, sym", [(2, True, False), (3, True, False), (4, False, True)])
def test_refit_scales_lowers_the_output_error_and_keeps_codes(layer_and_inputs, bits, desc_act, sym):
    """`refit`: the scales refitted to GPTQ's codes by least squares on the calibration output error: codes,
    zeros and g_idx unchanged, the output error lower (act-order's spread groups, and symmetric zeros)."""
    w, x = layer_and_inputs
    kw = dict(group_size=64, desc_act=desc_act, sym=sym, mse=True)
    plain, refit = gptq(w, x, bits, **kw), gptq(w, x, bits, refit=True, **kw)
    for name in ("codes", "zeros", "g_idx"):
        assert torch.equal(getattr(plain, name), getattr(refit, name)), name
    assert refit.scales.dtype == torch.float16 and not torch.equal(plain.scales, refit.scales)
    assert output_error(w, x, refit) < 0.995 * output_error(w, x, plain)


@pytest.mark.parametrize("desc_act, group_aware", [(True, False), (False, True)])
def test_solve_with_its_own_parameters_fixed_gives_its_codes(layer_and_inputs, desc_act, group_aware):
    """`refit_rounds`' sweep: GPTQ with an earlier result's scales, zeros and g_idx held fixed. Given the
    parameters GPTQ itself chose, it must choose the same codes (same order, same params at every column)."""
    w, x = layer_and_inputs
    g = GPTQ(w)
    g.add_batch(x)
    kw = dict(bits=2, group_size=64, sym=True, desc_act=desc_act, static_groups=False, damp=0.05, block_size=128,
              mse=True, min_zero=0, group_aware=group_aware)
    res = g._solve(w.clone(), g.H.clone(), **kw)
    again = g._solve(w.clone(), g.H.clone(), fixed=res, **kw)
    assert torch.equal(again.codes, res.codes) and torch.equal(again.g_idx, res.g_idx)
    assert again.scales is res.scales and again.zeros is res.zeros


def test_refit_rounds_keep_only_rounds_that_lower_the_output_error(layer_and_inputs):
    """`refit_rounds`: codes re-chosen with the refitted scales fixed, then refitted; on this layer the first
    round lowers the output error (so it is kept: new codes, same zeros and g_idx) and more rounds never raise it."""
    w, x = layer_and_inputs
    kw = dict(group_size=64, desc_act=True, mse=True, refit=True, damp=0.05)
    errs = [output_error(w, x, gptq(w, x, 2, refit_rounds=r, **kw)) for r in (0, 1, 3)]
    assert errs[1] < errs[0] and errs[2] <= errs[1]
    once, more = gptq(w, x, 2, **kw), gptq(w, x, 2, refit_rounds=1, **kw)
    assert torch.equal(once.zeros, more.zeros) and torch.equal(once.g_idx, more.g_idx)
    assert not torch.equal(once.codes, more.codes)


@pytest.mark.parametrize("bits, desc_act, refit", [(2, True, True), (3, False, False)])
def test_descent_passes_lower_the_output_error(layer_and_inputs, bits, desc_act, refit):
    """`descent_passes`: coordinate descent on the codes, scales fixed (then the refit where on): each pass lowers
    the calibration output error, by several percent over GPTQ's own codes; zeros and g_idx unchanged."""
    w, x = layer_and_inputs
    kw = dict(group_size=64, desc_act=desc_act, mse=True, refit=refit)
    res = [gptq(w, x, bits, descent_passes=p, **kw) for p in (0, 1, 2)]
    errs = [output_error(w, x, r) for r in res]
    assert errs[1] < 0.97 * errs[0] and errs[2] < errs[1]
    assert torch.equal(res[0].zeros, res[2].zeros) and torch.equal(res[0].g_idx, res[2].g_idx)


def test_descend_codes_never_raises_the_error_and_keeps_optimal_codes():
    """One coordinate-descent pass from any codes never raises tr(E H Eᵀ); from the exact codes of a
    representable W (error 0) it changes nothing."""
    from gptqlora.quant.gptq import descend_codes, output_error as err

    g = torch.Generator().manual_seed(2)
    res = _random_result(g)
    x = torch.randn(512, res.codes.shape[0], generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    W = res.dequantize() + 0.02 * torch.randn(res.dequantize().shape, generator=g)
    after = descend_codes(res, W, H, maxq=7)
    assert err(W, after.dequantize(), H) < err(W, res.dequantize(), H)
    exact = descend_codes(res, res.dequantize(), H, maxq=7)
    assert torch.equal(exact.codes, res.codes)


def test_descend_codes_in_blocks_equals_column_by_column():
    """descend_codes updates E H lazily, a block of columns at a time: the codes are those of updating it after
    every column (blocks of 1), with blocks that do not divide K."""
    from gptqlora.quant.gptq import descend_codes

    g = torch.Generator().manual_seed(3)
    res = _random_result(g)
    x = torch.randn(512, res.codes.shape[0], generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    W = res.dequantize() + 0.05 * torch.randn(res.dequantize().shape, generator=g)
    one = descend_codes(res, W, H, maxq=7, block_size=1)
    assert not torch.equal(one.codes, res.codes)
    assert torch.equal(descend_codes(res, W, H, maxq=7, block_size=40).codes, one.codes)


def _random_result(g: torch.Generator, k: int = 96, n: int = 16, gs: int = 32):
    """A 3-bit QuantResult with act-order's spread groups, drawn from `g`."""
    from gptqlora.quant.quantizer import QuantResult

    codes = torch.randint(0, 8, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(2, 6, (k // gs, n), generator=g, dtype=torch.int32)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)].to(torch.int32)  # act-order's spread groups
    scales = (torch.rand(k // gs, n, generator=g) * 0.1 + 0.01).half()
    return QuantResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, error=0.0)


def test_refit_scales_recovers_the_scales_of_representable_weights():
    """W = s (q - z) exactly, GPTQ's result given with wrong scales: the refit finds the true ones (fp16)."""
    import dataclasses

    from gptqlora.quant.gptq import refit_scales

    g = torch.Generator().manual_seed(0)
    true = _random_result(g)
    x = torch.randn(512, true.codes.shape[0], generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    off = dataclasses.replace(true, scales=(true.scales.float() * 1.3).half())
    got = refit_scales(off, true.dequantize(), H)
    torch.testing.assert_close(got.scales.float(), true.scales.float(), rtol=2e-3, atol=0)


def test_refit_scales_in_row_blocks_equals_all_rows_at_once(monkeypatch):
    """refit_scales solves its normal equations a block of rows at a time (a 65B layer's would not fit at once):
    rows are independent, so blocks of 3 rows give the same scales as one block."""
    from gptqlora.quant import gptq as G

    g = torch.Generator().manual_seed(1)
    res = _random_result(g)
    (k, n), ng = res.codes.shape, res.scales.shape[0]
    x = torch.randn(256, k, generator=g)
    H, W = 2 * x.t() @ x / x.shape[0], torch.randn(n, k, generator=g) * 0.05
    whole = G.refit_scales(res, W, H)
    monkeypatch.setattr(G, "REFIT_BYTES", 3 * 4 * ng**2)  # 3 rows a block: 6 blocks, the last of 1 row
    blocks = G.refit_scales(res, W, H)
    assert not torch.equal(whole.scales, res.scales) and torch.equal(blocks.scales, whole.scales)
