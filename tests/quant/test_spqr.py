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
