"""bench/gpu_check_decode.py's logic on CPU (interpreter, small shapes): a wrong kernel result fails its case,
a right one passes, and the case list needs few kernel compilations while covering the real-shape grid."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check_decode", BENCH / "gpu_check_decode.py")
    mod = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path  # bench/ must not shadow packages for later tests
    return mod


def test_case_grid_and_compile_classes(check):
    cases = check.cases(check.SHAPES)
    main = [c for c in cases if c["ms"] == check.MS]
    assert {(c["k"], c["n"], c["bits"], c["layout"]) for c in main} == {
        (k, n, b, lay) for k, n in check.SHAPES for b in check.BITS for lay in ("plain", "act-order")}
    assert all(c["lora"] for c in main)
    classes = check.compile_classes(cases)
    assert len(classes) <= 26 and all((c["k"], c["n"]) == (4096, 4096) for c in classes)


@pytest.mark.parametrize("layout", ["plain", "act-order"])
def test_a_wrong_result_fails_and_a_right_one_passes(check, monkeypatch, layout):
    case = dict(k=256, n=128, bits=3, layout=layout, ms=(1, 8), lora=True, dtype="bfloat16")
    (r1, r8) = check.run_case(case, torch.device("cpu"))
    assert r1["ok"] and r8["ok"] and r1["sorted"] and r1["deterministic"] and r1["counters_zero"]
    real = check.gemv_triton
    monkeypatch.setattr(check, "gemv_triton", lambda x, *a, **k: real(x, *a, **k) * 1.02)  # 2% off: over tol
    assert not any(r["ok"] for r in check.run_case(case, torch.device("cpu")))
    calls = []
    monkeypatch.setattr(check, "gemv_triton",  # every second call 0.8% off: within tolerance, but not equal
                        lambda x, *a, **k: calls.append(0) or real(x, *a, **k) * (1 + 2**-7 * (len(calls) % 2)))
    assert not any(r["ok"] for r in check.run_case(case, torch.device("cpu")))  # two calls differ: not deterministic


def test_spqr_section_fails_a_dropped_adapter(check, monkeypatch):
    """The SpQR decode rows pass on the real launch and fail where the fused LoRA update is lost."""
    from gptqlora.kernels import spqr_triton

    rows = check.check_spqr(torch.device("cpu"), [(256, 128)])
    assert len(rows) == 3 and all(r["ok"] for r in rows)
    real = spqr_triton.spqr_small_m
    monkeypatch.setattr(spqr_triton, "spqr_small_m", lambda x, t, bits, sb, plan, a=None, b=None, s=1.0:
                        real(x, t, bits, sb, plan))
    rows = check.check_spqr(torch.device("cpu"), [(256, 128)])
    assert [r["ok"] for r in rows] == [False, False, True]  # the two adapter rows, not the plain one


def test_generation_rows_may_part_only_at_a_tie(check):
    """near_ties: equal rows report nothing; a parting is a tie only where the reference's own score for the
    kernel's token lay within TIE of its pick, and the check refuses partings in the first two tokens."""
    ref = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    scores = torch.zeros(2, 4, 10)
    scores[:, :, 0] = 10.0  # the largest |logit|: TIE x 10 is the allowance
    scores[0, 2, 7], scores[0, 2, 1] = 3.0, 3.0 - 0.5 * check.TIE * 10  # row 0, step 2: token 1 nearly tied with 7
    scores[1, 2, 7], scores[1, 2, 1] = 3.0, 2.0  # row 1: a full logit apart
    assert check.near_ties(ref, ref.clone(), scores) == []
    got = ref.clone()
    got[:, 2] = 1
    ties = check.near_ties(ref, got, scores)
    assert [(t["row"], t["step"], t["tie"]) for t in ties] == [(0, 2, True), (1, 2, False)]
