"""The one-token decode kernel (kernels/gemv_m1.py) against float64 and against gemv.py's split-K kernel:
2/4/8 bit, plain and act-order (repacked) rows, packed and float zeros, fp32/fp16/bf16, with and without LoRA,
tiles inside one group and across groups, split-K on and off, N not a multiple of the column block, sibling
bounds narrower than a column block; the offsets' cancellation at its worst; and which calls it takes."""

import json

import pytest
import torch

from gptqlora.formats.gptq import pack_cols, pack_rows
from gptqlora.kernels import gemv, gemv_m1
from gptqlora.kernels.gemv import gemv_reference, gemv_triton, pick_config, plan_gemv
from gptqlora.kernels.reference import dequantize
from packed import random_packed
from test_gemv import DEVICE, TOL, case, rel_err, tuned_table_file


@pytest.fixture(autouse=True)
def inplace(monkeypatch):
    """GPTQLORA_GEMV_M1=inplace: gemv_triton routes every one-token call it can serve here (8 bit too)."""
    monkeypatch.setenv(gemv_m1.ENV, "inplace")

CONFIGS = (None,  # the heuristic: tiles inside a group, split-K
           {"NREP": 1, "BW": 4, "SPLIT": 5, "num_warps": 4, "PREFETCH": 1},  # the next tile prefetched
           {"NREP": 1, "BW": 8, "SPLIT": 1, "num_warps": 2},  # one program per column block over all of K
           {"NREP": 2, "BW": 16, "SPLIT": 3, "num_warps": 4},  # tiles across groups (16 word rows)
           {"NREP": 1, "BW": 4, "SPLIT": 2, "num_warps": 4, "loop_stages": 3},  # the loop's loads staged (cp.async)
           {"NREP": 8, "BW": 4, "SPLIT": 1, "num_warps": 4})  # 8 column blocks a thread, past N (masked)


def run(x, p, bits, plan, a, b, cfg, bounds=None):
    """gemv_triton's one-token path, or gemv_m1 at config `cfg` (made legal)."""
    if cfg is None:
        return gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, plan, a, b, 2.0, bounds=bounds)
    k, n = x.shape[1], p["qweight"].shape[1]
    lora = None if a is None else a if isinstance(a, list) else [a]
    lorb = None if b is None else b if isinstance(b, list) else [b]
    return gemv_m1.gemv_m1(x, p["qweight"], p["zeros"], p["scales"], bits, plan,
                           gemv_m1.legal_config(cfg, k, n, bits, bounds), lora, lorb, 2.0, bounds)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("layout", [(False, False), (True, False), (True, True)], ids=["plain", "act-order", "float-zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_matches_float64_and_the_split_k_kernel(bits, layout, dtype):
    group = {2: 32, 4: 64, 8: -1}[bits]
    lora = layout != (True, True)
    p, x, a, b, want = case(256, 208, bits, group, *layout, 1, dtype, seed=bits + 7 * layout[0], lora=lora)
    plan = plan_gemv(p["qweight"], p["g_idx"], bits, group, True)
    assert gemv_m1.takes(1, 256, bits, plan, False)
    for cfg in CONFIGS:  # N = 208: a partial column block
        y = run(x, p, bits, plan, a, b, cfg)
        assert y.dtype == dtype and y.shape == (1, 208)
        assert rel_err(y, want) < TOL[dtype], cfg
        assert not plan.locks.any()  # the split-K counters are back at zero
    other = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, plan, a, b, 2.0,
                        config=pick_config(1, 256, 208, bits, plan))  # a config given: gemv.py's kernel
    assert rel_err(y, other.double()) < TOL[dtype]
    assert rel_err(y, gemv_reference(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, a, b, 2.0).double()) \
        < TOL[dtype]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_exact_enough_where_the_offsets_cancel_most(bits):
    """The kernel sums (m + q) x and subtracts Σ m x once per tile. The cancellation is largest for small codes
    and x of one sign; y must still be close to float64: 1e-6 with fp32 x (no shift window), and at 16-bit
    x within one rounding of y (a whole bf16 step: the interpreter truncates to bf16 where a GPU rounds)."""
    k, n = 1024, 32
    codes = torch.ones(k, n, dtype=torch.int32)
    codes[::7] = 2**bits - 1
    zeros = torch.zeros(k // 128, n, dtype=torch.int32)
    scales = torch.full((k // 128, n), 0.01).half()
    g_idx = torch.arange(k, dtype=torch.int32) // 128
    p = {"qweight": pack_rows(codes, bits).to(DEVICE), "zeros": pack_cols(zeros, bits).to(DEVICE),
         "scales": scales.to(DEVICE), "g_idx": g_idx.to(DEVICE)}
    plan = plan_gemv(p["qweight"], p["g_idx"], bits, 128)
    w = dequantize(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, torch.float64)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2**-11), (torch.bfloat16, 2**-7)):
        x = (torch.rand(1, k, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(bits)) * 4 + 1).to(dtype)
        want = x.double() @ w
        for cfg in CONFIGS:
            y = run(x, p, bits, plan, None, None, cfg).double()
            assert float(((y - want).abs() / want.abs()).max()) < tol, (dtype, cfg)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_precomputed_u_matches_float64(bits, dtype, monkeypatch):
    """GPTQLORA_GEMV_LORA_U=1: the adapter's u = x Aᵀ comes from kernels/lora_u.py once per call and only split
    0 adds u Bᵀ; every config (split-K or not) gives the float64 result, and the counters end at zero."""
    monkeypatch.setenv(gemv_m1.U_ENV, "1")
    group = {2: 32, 4: 64}[bits]
    p, x, a, b, want = case(256, 208, bits, group, True, False, 1, dtype, seed=bits + 3, lora=True)
    plan = plan_gemv(p["qweight"], p["g_idx"], bits, group, True)
    for cfg in CONFIGS:
        y = run(x, p, bits, plan, a, b, cfg)
        assert rel_err(y, want) < TOL[dtype] and not plan.locks.any(), cfg
    monkeypatch.setenv(gemv_m1.U_ENV, "0")  # and it is the adapter that differs: without it, far off
    assert rel_err(run(x, p, bits, plan, None, None, CONFIGS[1]), want) > 10 * TOL[dtype]


@pytest.mark.parametrize("upre", ["0", "1"], ids=["u-per-program", "u-once"])
@pytest.mark.parametrize("widths", [(64, 32, 32), (256, 128, 128), (384, 160)], ids=["narrow", "q|k|v", "gate|up"])
def test_siblings_take_their_own_lora(widths, upre, monkeypatch):
    """Projections side by side (`bounds`): each column block uses its own projection's A and B (or u, with
    GPTQLORA_GEMV_LORA_U=1), also where a projection is narrower than a column block (the block shrinks) and
    with a row stride wider than N (an act-order layer's decode copy as a column slice of the siblings' copy)."""
    monkeypatch.setenv(gemv_m1.U_ENV, upre)
    parts = [case(128, n, 4, 32, False, False, 1, torch.float32, seed=40 + i) for i, n in enumerate(widths)]
    x = parts[0][1]
    cat = {f: torch.cat([q[f] for q, *_ in parts], dim=1) for f in ("qweight", "zeros", "scales")}
    cat["g_idx"] = parts[0][0]["g_idx"]
    a = [pa for _, _, pa, _, _ in parts]
    b = [pb for _, _, _, pb, _ in parts]
    ends = [sum(widths[:i + 1]) for i in range(len(widths))]
    bounds = (ends[0], ends[1] if len(widths) == 3 else ends[-1])
    plan = plan_gemv(cat["qweight"], cat["g_idx"], 4, 32)
    want = torch.cat([x.double() @ q["w64"].to(DEVICE) + 2.0 * (x.double() @ pa.double().t()) @ pb.double().t()
                      for q, _, pa, pb, _ in parts], dim=1)
    for cfg in CONFIGS:
        y = run(x, cat, 4, plan, a, b, cfg, bounds)
        assert rel_err(y, want) < 1e-5 and not plan.locks.any(), cfg
    # the second projection alone, read as a column slice of the side-by-side weight (row stride > N)
    n0, n1 = ends[0], ends[1]
    sl = {"qweight": cat["qweight"][:, n0:n1], "zeros": parts[1][0]["zeros"], "scales": parts[1][0]["scales"],
          "g_idx": cat["g_idx"]}
    plan1 = plan_gemv(sl["qweight"], sl["g_idx"], 4, 32)
    assert plan1.qweight.stride(0) > plan1.qweight.shape[1]
    y1 = run(x, sl, 4, plan1, a[1], b[1], None)
    assert rel_err(y1, want[:, n0:n1]) < 1e-5
    # siblings without an adapter (lora_slots raised here until session 18; decode_group never asks, scripts did)
    base = torch.cat([x.double() @ q["w64"].to(DEVICE) for q, *_ in parts], dim=1)
    for cfg in CONFIGS:
        assert rel_err(run(x, cat, 4, plan, None, None, cfg, bounds), base) < 1e-5, cfg


def test_takes_one_token_whole_words_and_sorted_rows_only(monkeypatch):
    p = random_packed(256, 64, 4, 64, True, False, 0, DEVICE)
    sorted_plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64, True)
    gather_plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64, False)
    assert gemv_m1.takes(1, 256, 4, sorted_plan, False)
    assert not gemv_m1.takes(2, 256, 4, sorted_plan, False)  # M > 1: gemv.py's tensor-core path
    assert not gemv_m1.takes(1, 256, 4, gather_plan, False)  # act-order without the repacked copy
    assert not gemv_m1.takes(1, 256, 4, sorted_plan, True)  # SpQR's dense part
    p3 = random_packed(256, 64, 3, 64, False, False, 0, DEVICE)
    assert not gemv_m1.takes(1, 256, 3, plan_gemv(p3["qweight"], p3["g_idx"], 3, 64), False)  # words straddle
    odd = random_packed(240, 64, 2, 40, False, False, 0, DEVICE)  # 40-row groups: a 16-row word spans two
    assert not gemv_m1.takes(1, 240, 2, plan_gemv(odd["qweight"], odd["g_idx"], 2, 40), False)
    monkeypatch.setenv(gemv_m1.ENV, "split")
    assert not gemv_m1.takes(1, 256, 4, sorted_plan, False)
    monkeypatch.delenv(gemv_m1.ENV)  # the default: this kernel at 2 and 4 bit, gemv.py's at 8 (unmeasured here)
    assert gemv_m1.takes(1, 256, 4, sorted_plan, False)
    p2, p8 = (random_packed(256, 64, b, 64, False, False, 0, DEVICE) for b in (2, 8))
    assert gemv_m1.takes(1, 256, 2, plan_gemv(p2["qweight"], p2["g_idx"], 2, 64), False)
    plan8 = plan_gemv(p8["qweight"], p8["g_idx"], 8, 64)
    assert not gemv_m1.takes(1, 256, 8, plan8, False)
    monkeypatch.setenv(gemv_m1.ENV, "inplace")
    assert gemv_m1.takes(1, 256, 8, plan8, False)


@pytest.mark.parametrize("k, n, group", [(160, 32, 32), (288, 48, 96), (192, 40, -1)])
def test_odd_groups_and_legal_configs(k, n, group):
    """Groups of 96 rows (tiles of 32 rows across them), one group per channel, K not a power of two; any
    config is made legal (BW dividing K's word rows, warps <= BW, no split without rows)."""
    p, x, a, b, want = case(k, n, 4, group, True, False, 1, torch.float32, seed=k + n)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, group, True)
    for cfg in ({"NREP": 4, "BW": 64, "SPLIT": 99, "num_warps": 16}, {"NREP": 1, "BW": 2, "SPLIT": 2, "num_warps": 8}):
        legal = gemv_m1.legal_config(cfg, k, n, 4, None)
        assert (k // 8) % legal["BW"] == 0 and legal["num_warps"] <= legal["BW"] and legal["SPLIT"] <= k // 8
        assert rel_err(run(x, p, 4, plan, a, b, cfg), want) < 1e-5


def test_tuned_table_entries_for_this_kernel(tmp_path, monkeypatch):
    """An "m1,..." entry of the tuned table (bench/gemv_m1_probe.py --table writes them) sets this kernel's
    config for its shape, made legal; a field this kernel does not have is refused with the allowed ones."""
    p, x, a, b, want = case(256, 64, 4, 64, True, False, 1, torch.float32, seed=12)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64)
    path = tmp_path / "configs.json"
    with tuned_table_file(monkeypatch, path, {gemv_m1.tuned_key(4, 256, 64): {
            "NREP": 1, "BW": 64, "SPLIT": 2, "num_warps": 8, "PREFETCH": 1}}):
        cfg = gemv.pick_m1_config(256, 64, 4, plan.group, 4, None)
        assert (cfg["NREP"], cfg["BW"], cfg["SPLIT"], cfg["num_warps"], cfg["PREFETCH"]) == (1, 32, 1, 8, 1)
        y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 2.0)
        assert rel_err(y, want) < 1e-5 and not plan.locks.any()
        path.write_text(json.dumps({"configs": {gemv_m1.tuned_key(4, 256, 64): {"BN": 32}}}))
        gemv.tuned_table.cache_clear()
        with pytest.raises(ValueError, match="m1 keys"):
            gemv.tuned_table()


_SM90 = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gptqlora.kernels import gemv_m1

values = json.loads(sys.argv[1])
ints = ("qweight_ptr", "zeros_ptr", "perm_ptr", "lock_ptr", "ahead_ptr")
types = {"x_ptr": "*bf16", "out_ptr": "*bf16", "scales_ptr": "*fp16", "lora_scale": "fp32"}
sig = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "*i32" if p.name in ints else
                                                           "*fp32" if p.name.endswith("_ptr") else "i32")
       for p in gemv_m1._gemv_m1_kernel.params}
src = ASTSource(gemv_m1._gemv_m1_kernel, sig, {n: values[n] for n, t in sig.items() if t == "constexpr"})
try:
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
except RuntimeError as e:  # a Triton build without the CUDA backend's toolchain
    print("SKIP", e)
    sys.exit(0)
sys.stdout.write(k.asm["ptx"])
"""


def _sm90_ptx(**constexprs) -> str:
    """The one-token kernel compiled offline for sm_90 (no GPU needed: Triton's CUDA backend and its ptxas), in a
    process of its own: this suite runs under TRITON_INTERPRET=1, whose kernels cannot be compiled."""
    import os
    import subprocess
    import sys

    values = dict(BITS=4, FLOAT_ZEROS=False, HAS_PERM=True, HAS_LORA=True, SPLIT_K=True, ONE_GROUP=True, BW=4,
                  NREP=2, COLS=128, BR=8, PREFETCH=False, LOOP_STAGES=1, UPRE=False, AHEAD=0, PFB=128,
                  EVICT_LAST=True, OWN_FIRST=False, SELF_PF=False) | constexprs
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SM90, json.dumps(values)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout)
    return done.stdout


def test_l2_self_compiles_to_prefetches_for_sm90():
    """SELF_PF: each program asks L2 for its own words (plain prefetches, no hint) before its loop."""
    ptx = _sm90_ptx(SELF_PF=True)
    prefetches = [ln for ln in ptx.splitlines() if "prefetch.global.L2" in ln]
    assert prefetches and not any("evict" in ln for ln in prefetches)


@pytest.mark.parametrize("ahead,last,own", [(0, True, False), (1, True, False), (2, False, True)])
def test_l2_ahead_compiles_to_prefetches_for_sm90(ahead, last, own):
    """AHEAD 1/2 (before / after the program's own loop) issue L2 prefetches of the next launch's words, with
    the evict_last hint or without; AHEAD 0 none; OWN_FIRST reads the layer's own words with evict_first. The
    interpreter cannot run inline PTX, so this (and the GPU chain bench, bench/l2_ahead.py) is their check."""
    ptx = _sm90_ptx(AHEAD=ahead, EVICT_LAST=last, OWN_FIRST=own)
    prefetches = [ln for ln in ptx.splitlines() if "prefetch.global.L2" in ln]
    assert (len(prefetches) > 0) == (ahead > 0)
    assert all(("evict_last" in ln) == last for ln in prefetches)
    assert ("L2::evict_first" in ptx) == own


def test_ahead_config_caps_and_is_off_where_it_cannot_run(monkeypatch):
    """GPTQLORA_L2_AHEAD: MB of the next weight (capped at its size; "all"), after the loop unless "start";
    off when unset or 0, for CPU tensors, non-int32 tensors and in the interpreter."""
    from types import SimpleNamespace

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in gemv_m1.L2_ENVS:
        monkeypatch.delenv(name, raising=False)
    words = 3 * 2**20  # a 12 MB packed weight
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.int32, numel=lambda: words, element_size=lambda: 4)
    assert gemv_m1.ahead_config(cuda) == (0, 0, False, False)  # unset: off
    monkeypatch.setenv(gemv_m1.AHEAD_ENV, "8")
    assert gemv_m1.ahead_config(cuda) == (2, 8 * 2**20 // 128, True, False)
    monkeypatch.setenv(gemv_m1.AHEAD_ENV, "all")
    monkeypatch.setenv(gemv_m1.AHEAD_AT_ENV, "start")
    monkeypatch.setenv(gemv_m1.AHEAD_LAST_ENV, "0")
    monkeypatch.setenv(gemv_m1.OWN_FIRST_ENV, "1")
    assert gemv_m1.ahead_config(cuda) == (1, 12 * 2**20 // 128, False, True)
    monkeypatch.setenv(gemv_m1.AHEAD_ENV, "64")  # more than there is: all of it
    assert gemv_m1.ahead_config(cuda)[1] == 12 * 2**20 // 128
    assert gemv_m1.ahead_config(None)[0] == 0
    assert gemv_m1.ahead_config(torch.zeros(64, dtype=torch.int32))[0] == 0  # CPU
    assert gemv_m1.ahead_config(SimpleNamespace(**{**vars(cuda), "dtype": torch.float16}))[0] == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gemv_m1.ahead_config(cuda)[0] == 0


def test_ahead_leaves_the_result_unchanged_in_the_interpreter(monkeypatch):
    """A call given the next launch's weight computes what it did without (the prefetch is a hint, and the
    interpreter skips it: this checks the argument's plumbing, the sm_90 test above the instructions)."""
    monkeypatch.setenv(gemv_m1.AHEAD_ENV, "all")
    p = random_packed(256, 128, 4, 32, act_order=True, float_zeros=False, seed=5, device=DEVICE)
    nxt = random_packed(128, 96, 4, 32, act_order=False, float_zeros=False, seed=6, device=DEVICE)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 32, repack=True)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan)
    got = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, ahead=nxt["qweight"])
    assert torch.equal(got, want)
