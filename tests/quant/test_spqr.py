"""SpQR solver: beats GPTQ at equal bits on planted outlier columns, lands on a target outlier fraction, and
its reconstruction is exactly what the packed layer dequantizes to."""

import pytest
import torch

from gptqlora.formats.spqr import average_bits
from gptqlora.nn.spqr_linear import SpQRLinear
from gptqlora.quant.gptq import GPTQ
from gptqlora.quant.spqr import SpQR, leave_one_out_gain


def planted(n=128, k=256, seed=0):
    """W [N, K] with three input columns 20x larger (outlier columns), inputs X [T, K] with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.tensor([5, 77, 200]) % k] *= 20
    x = torch.randn(1024, k, generator=g) * (0.5 + torch.rand(k, generator=g))
    return w, x


def solve(cls, w, x, **kw):
    s = cls(w)
    s.add_batch(x)
    return s.quantize(**kw)


def rel_err(w, wq, x):
    return float(((x @ (wq - w).t()) ** 2).sum() / (x @ w.t()).pow(2).sum())


def test_spqr_beats_gptq_at_equal_bits_on_outlier_columns():
    w, x = planted()
    sp = solve(SpQR, w, x, bits=3, group_size=16, sym=False, outlier_threshold=0.3)
    layer = SpQRLinear.from_codes(**sp.layer_kwargs(), group_size=16, bits=3)
    sp_bits = layer.average_bits
    assert sp_bits == pytest.approx(average_bits(3, 16, 3, 16, sp.outlier_fraction))
    # GPTQ at at least as many bits per weight: 4 bit, group 128 (fp16 scale + 4-bit zero per group) = 4.16
    gq = solve(GPTQ, w, x, bits=4, group_size=128, sym=False)
    gptq_bits = 4 + (16 + 4) / 128
    assert sp_bits <= gptq_bits
    e_sp, e_gq = rel_err(w, sp.dequantize(), x), rel_err(w, gq.dequantize(), x)
    assert e_sp < 0.5 * e_gq, (e_sp, e_gq)
    # and plain GPTQ at SpQR's own first-level settings (3 bit, group 16, fp16 stats: 4.19 bits) loses too
    assert e_sp < rel_err(w, solve(GPTQ, w, x, bits=3, group_size=16, sym=False).dequantize(), x)


@pytest.mark.parametrize("target", [0.005, 0.02])
def test_outlier_fraction_lands_near_the_target(target):
    w, x = planted(n=64, k=128, seed=1)
    res = solve(SpQR, w, x, bits=3, group_size=16, outlier_fraction=target, desc_act=True)
    assert abs(res.outlier_fraction - target) <= 0.2 * target, (res.outlier_fraction, res.threshold, res.passes)
    assert res.passes <= 10


def test_reconstruction_equals_the_packed_layer_exactly():
    w, x = planted(n=64, k=128, seed=2)
    res = solve(SpQR, w, x, bits=3, group_size=16, desc_act=True, outlier_threshold=0.2)
    assert 0 < res.outlier_fraction < 0.2
    layer = SpQRLinear.from_codes(**res.layer_kwargs(), group_size=16, bits=3)
    assert layer.nnz == int(res.outlier_mask.sum())
    assert torch.equal(layer.dequantize(torch.float32).t(), res.dequantize())
    # the dense part alone is the codes on the decoded grid; the outliers are the residuals at their places
    dense_only = res.dequantize() - res.outlier_residual.float()
    assert torch.equal(dense_only[~res.outlier_mask], res.dequantize()[~res.outlier_mask])


def test_no_outliers_without_a_threshold_or_fraction():
    w, x = planted(n=64, k=64)
    res = solve(SpQR, w, x, bits=4, group_size=16, outlier_fraction=None)
    assert res.outlier_fraction == 0 and res.threshold == float("inf")


def test_leave_one_out_gain_flags_the_planted_weight():
    g = torch.randn(8, 16) * 0.01
    g[3, 7] = 1.0
    gain = leave_one_out_gain(g, torch.ones(16), bits=3, sym=False)
    assert gain.shape == (8, 16) and int(gain.argmax()) == 3 * 16 + 7


def perturbed_inputs(x_fp, seed=0):
    """What a layer sees after earlier layers were quantized: its fp inputs plus a correlated error."""
    gen = torch.Generator().manual_seed(seed)
    k = x_fp.shape[1]
    return x_fp + 0.3 * x_fp.std() * torch.randn(x_fp.shape, generator=gen) @ torch.randn(k, k, generator=gen) / 16


def test_spqr_gptaq_targets_the_fp_output():
    """GPTQ's asymmetric calibration in SpQR's pass: Q x closer to the fp layer's W x_fp; without fp inputs
    (D never accumulated) gptaq changes nothing."""
    w, x_fp = planted(n=64, k=128, seed=3)
    x = perturbed_inputs(x_fp)

    def asym(alpha, fp=x_fp):
        s = SpQR(w)
        for a, b in zip(x.split(256), fp.split(256) if fp is not None else [None] * 4):
            s.add_batch(a, b)
        return s.quantize(bits=3, group_size=16, desc_act=True, outlier_threshold=0.2, gptaq=alpha)

    def fp_error(res):
        return float((x_fp @ w.t() - x @ res.dequantize().t()).pow(2).mean())

    assert fp_error(asym(1.0)) < 0.9 * fp_error(asym(0.0))
    assert torch.equal(asym(1.0, fp=None).recon, asym(0.0).recon)


def test_spqr_mse_searches_each_group_range():
    """`mse` (GPTQ's clipping search, on by default in `quantize`) fits the first-level ranges; the packed
    layer still dequantizes to exactly the solver's reconstruction."""
    w, x = planted(n=64, k=128, seed=4)
    plain = solve(SpQR, w, x, bits=3, group_size=16, desc_act=True, outlier_threshold=0.2)
    res = solve(SpQR, w, x, bits=3, group_size=16, desc_act=True, outlier_threshold=0.2, mse=True)
    assert not torch.equal(res.scales_code, plain.scales_code)
    assert rel_err(w, res.dequantize(), x) < rel_err(w, plain.dequantize(), x)
    layer = SpQRLinear.from_codes(**res.layer_kwargs(), group_size=16, bits=3)
    assert torch.equal(layer.dequantize(torch.float32).t(), res.dequantize())


def test_quantize_gives_spqr_the_fp_inputs_and_gptqs_defaults(tiny_dir, tmp_path, monkeypatch):
    """The driver feeds SpQR as it feeds GPTQ: fp inputs (D accumulated) with gptaq 1, mse on, damp .05."""
    import json

    from gptqlora.cli import main
    from gptqlora.quant.solvers import SOLVERS

    seen = []

    class Spy(SpQR):
        def quantize(self, **kw):
            seen.append((kw, self.D is not None))
            return super().quantize(**kw)

    monkeypatch.setitem(SOLVERS, "spqr", Spy)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"a quick brown fox {i} jumps over it"}) for i in range(20)))
    assert main(["quantize", str(tiny_dir), str(tmp_path / "q"), "--method", "spqr", "--bits", "3",
                 "--calibration", str(calib), "--nsamples", "2", "--seqlen", "32"]) == 0
    kw, has_d = seen[0]
    assert has_d and (kw["gptaq"], kw["mse"], kw["damp"]) == (1.0, True, 0.05)
    assert main(["quantize", str(tiny_dir), str(tmp_path / "q0"), "--method", "spqr", "--bits", "3", "--gptaq", "0",
                 "--calibration", str(calib), "--nsamples", "2", "--seqlen", "32"]) == 0
    kw, has_d = seen[-1]
    assert not has_d and kw["gptaq"] == 0


def test_quantize_gives_spqr_the_descent_passes(tiny_dir, tmp_path, monkeypatch, capsys):
    """--descent-passes reaches SpQR as it reaches GPTQ, but opt-in: SpQR's default is 0 (GPTQ's 3), the count given
    is passed, and the checkpoint's meta records the count used; a negative count is refused with the option's
    own message before anything runs."""
    import json

    from gptqlora.checkpoint.config import QuantConfig
    from gptqlora.cli import main
    from gptqlora.quant.solvers import SOLVERS

    seen = []

    class Spy(SpQR):
        def quantize(self, **kw):
            seen.append(kw["descent_passes"])
            return super().quantize(**kw)

    monkeypatch.setitem(SOLVERS, "spqr", Spy)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"a quick brown fox {i} jumps over it"}) for i in range(20)))
    args = ["--method", "spqr", "--bits", "3", "--calibration", str(calib), "--nsamples", "2", "--seqlen", "32"]
    assert main(["quantize", str(tiny_dir), str(tmp_path / "q"), *args]) == 0
    assert seen[-1] == 0 and QuantConfig(bits=3).descent == 3 and QuantConfig(bits=3, format="spqr").descent == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["descent_passes"] == 0
    assert not {"refit_scales", "refit_rounds", "mse_select", "act_group_aware"} & set(qc["meta"])  # GPTQ's only
    assert main(["quantize", str(tiny_dir), str(tmp_path / "q1"), *args, "--descent-passes", "1"]) == 0
    assert seen[-1] == 1
    n = len(seen)
    assert main(["quantize", str(tiny_dir), str(tmp_path / "q2"), *args, "--descent-passes", "-1"]) != 0
    assert "--descent-passes: must be >= 0, got -1" in capsys.readouterr().err and len(seen) == n


@pytest.mark.parametrize("desc_act, seed", [(True, 5), (False, 6)])
def test_spqr_descent_never_raises_the_output_error(desc_act, seed):
    """`descent_passes`: GPTQ's coordinate descent on SpQR's codes under the damped H never raises the calibration
    output error tr(E Hd Eᵀ), pass after pass (and lowers it); the statistics and the outliers' places stay, the
    outliers' values move, and the packed layer still dequantizes to exactly the solver's reconstruction."""
    from gptqlora.quant.gptq import damped, output_error

    w, x = planted(n=64, k=128, seed=seed)
    Hd = damped(2 * x.t() @ x / x.shape[0], 0.05)
    res = [solve(SpQR, w, x, bits=3, group_size=16, desc_act=desc_act, outlier_fraction=0.02, mse=True, damp=0.05,
                 descent_passes=p) for p in (0, 1, 2, 3)]
    errs = [output_error(w, r.dequantize(), Hd) for r in res]
    assert errs[1] < 0.99 * errs[0], errs
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
    stats = ("scales_code", "scales_step", "scales_base", "zeros_code", "zeros_step", "zeros_base")
    for r in res[1:]:
        assert torch.equal(r.outlier_mask, res[0].outlier_mask)
        for name in stats:
            assert torch.equal(getattr(r, name), getattr(res[0], name)), name
        layer = SpQRLinear.from_codes(**r.layer_kwargs(), group_size=16, bits=3)
        assert torch.equal(layer.dequantize(torch.float32).t(), r.dequantize())
        assert torch.equal(r.outlier_residual[~r.outlier_mask], torch.zeros_like(r.outlier_residual[~r.outlier_mask]))
    assert not torch.equal(res[3].outlier_residual, res[0].outlier_residual)
    assert not torch.equal(res[3].codes, res[0].codes)


def test_descent_gives_free_positions_their_exact_optimum():
    """`descend` with `free` positions (SpQR's outliers): with uncorrelated inputs (H diagonal) each weight's optimum
    is itself, so a free weight is reproduced up to the fp16 rounding of its residual while the others stay on the
    grid; the error never rises, and the reconstruction stays grid value + stored residual."""
    from gptqlora.quant.gptq import descend, output_error

    g = torch.Generator().manual_seed(7)
    n, k, maxq = 32, 48, 7
    W = torch.randn(n, k, generator=g)
    H = torch.diag(0.5 + torch.rand(k, generator=g))
    S = torch.full((1, n), 0.3)
    Z = torch.full((1, n), 3.4)  # float zeros, as SpQR's decoded statistics
    gidx = torch.zeros(k, dtype=torch.long)
    codes = torch.clamp(torch.round(W / 0.3 + 3.4), 0, maxq).t().contiguous()  # (K, N) nearest codes
    grid = 0.3 * (codes.t() - 3.4)  # (N, K)
    free = torch.rand(n, k, generator=g) < 0.1
    resid = torch.zeros(n, k)
    Wq = grid.clone()
    before = output_error(W, Wq, H)
    descend(W, H, Wq, codes, S, Z, gidx, maxq, block_size=16, free=free, resid=resid)
    assert output_error(W, Wq, H) < before
    assert torch.equal(Wq, 0.3 * (codes.t() - 3.4) + resid)  # grid + residual, bit for bit
    assert torch.equal(resid[~free], torch.zeros_like(resid[~free])) and torch.equal(resid, resid.half().float())
    assert torch.equal(Wq[~free], grid[~free])  # nearest grid points already: unchanged
    assert (Wq - W)[free].abs().max() <= 1e-3 * 0.3 * maxq  # fp16 rounding of a residual within the group's range
