"""The small-M decode kernel against float64 and the torch reference: every bit width, group size, act-order
(repacked and gathered), packed and float zeros, fp32/fp16/bf16, odd shapes, split-K, fused LoRA."""

import contextlib
import json

import pytest
import torch

from gptqlora.kernels import gemv
from gptqlora.kernels.gemv import gemv_reference, gemv_triton, legal_config, pick_config, plan_gemv
from packed import random_packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # one rounding of y (and of A, B)


def rel_err(got, ref) -> float:
    return float((got.double() - ref).norm() / ref.norm())


def case(k, n, bits, group, act_order, float_zeros, m, dtype, seed, lora=True):
    p = random_packed(k, n, bits, group, act_order, float_zeros, seed, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, device=DEVICE, generator=g).to(dtype)
    a = (torch.randn(8, k, device=DEVICE, generator=g) * 0.1).to(dtype) if lora else None
    b = (torch.randn(n, 8, device=DEVICE, generator=g) * 0.1).to(dtype) if lora else None
    want = x.double() @ p["w64"].to(DEVICE)
    if lora:
        want = want + 2.0 * (x.double() @ a.double().t()) @ b.double().t()
    return p, x, a, b, want


LAYOUTS = [(False, False), (True, False), (True, True)]  # (act_order, float_zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "act-order", "act-order-float-zeros"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_matches_float64_and_reference(bits, layout, m):
    i = bits + 3 * m + LAYOUTS.index(layout)
    dtype, group = DTYPES[i % 3], (32, 64, -1)[i % 3]
    p, x, a, b, want = case(256, 96, bits, group, *layout, m, dtype, seed=i)
    args = p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits
    ref = gemv_reference(x, *args, a, b, 2.0)
    for repack in (True, False) if layout[0] else (True,):  # act-order: the repacked copy, and the per-row gather
        plan = plan_gemv(p["qweight"], p["g_idx"], bits, group, repack)
        y = gemv_triton(x, *args, plan, a, b, 2.0)
        assert y.dtype == dtype and y.shape == (m, 96)
        assert rel_err(y, want) < TOL[dtype], (repack, plan.sorted)
        assert rel_err(y, ref.double()) < TOL[dtype]
        assert not plan.locks.any()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 9])
def test_split_k_sums_all_partials_and_resets_its_counters(bits, m):
    p, x, a, b, want = case(384, 64, bits, 64, True, False, m, torch.float32, seed=bits * m)
    plan = plan_gemv(p["qweight"], p["g_idx"], bits, 64)
    cfg = {**pick_config(m, 384, 64, bits, plan), "SPLIT": 3, "BN": 32}  # 2 column blocks x 3 splits
    for _ in range(2):  # the second call finds the counters at zero again
        y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, plan, a, b, 2.0, config=cfg)
        assert rel_err(y, want) < 1e-5
        assert not plan.locks.any()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 9])
def test_loop_stages_change_no_result(bits, m):
    """loop_stages > 1 only stages the loop's loads (cp.async on a GPU): the same sums in the same order, so
    the same output as one stage, with split-K, a last tile cut short (K = 352 rows in tiles of 64) and both
    row layouts (group order, and the per-row gather of an act-order layer without its copy)."""
    p, x, a, b, want = case(352, 96, bits, 32, True, False, m, torch.float32, seed=bits + m)
    for repack in (True, False):
        plan = plan_gemv(p["qweight"], p["g_idx"], bits, 32, repack)
        cfg = {**pick_config(m, 352, 96, bits, plan), "SPLIT": 2, "BN": 64, "BK": 64}
        ys = [gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, plan, a, b, 2.0,
                          config={**cfg, "loop_stages": st}) for st in (1, 3)]
        assert torch.equal(ys[0], ys[1]), repack
        assert rel_err(ys[1], want) < 1e-5 and not plan.locks.any()


@pytest.mark.parametrize("m", [1, 5])
def test_three_bit_whole_block_tiles(m):
    """3 bit in tiles of whole 32-row blocks (three words loaded once, each code shifted out of a 64-bit
    pair) against the straddling per-code path of 16-row tiles and float64: tiles of 32, 64 and 128 rows,
    K = 352 (the last tile's fourth block beyond K), split-K, both row layouts."""
    p, x, a, b, want = case(352, 96, 3, 32, True, False, m, torch.float32, seed=30 + m)
    for repack in (True, False):
        plan = plan_gemv(p["qweight"], p["g_idx"], 3, 32, repack)
        base = {**pick_config(m, 352, 96, 3, plan), "SPLIT": 2, "BN": 32}
        ys = {bk: gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 3, plan, a, b, 2.0,
                              config={**base, "BK": bk}) for bk in ((16, 32) if repack else (16, 32, 64, 128))}
        for bk, y in ys.items():
            assert rel_err(y, want) < 1e-5, (repack, bk)
        assert not plan.locks.any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_one_token_tiles_spanning_small_groups(bits):
    """`span`: a one-token tile of 64 or 128 rows over whole groups of 16 or 32 (statistics per group, sums
    per group, then added) against the tiles cut to one group, and float64; split-K, K = 352 (a last tile
    that runs past K), the per-row gather unchanged; at M > 1 `span` is ignored (BK cut to the group)."""
    for group in (16, 32):
        if group % (32 // bits if 32 % bits == 0 else 1):
            continue  # 8 bit packs 4 rows a word: every group here is whole words; kept for the pattern
        p, x, a, b, want = case(352, 96, bits, group, True, False, 1, torch.float32, seed=bits * group)
        plan = plan_gemv(p["qweight"], p["g_idx"], bits, group)
        base = {**pick_config(1, 352, 96, bits, plan), "SPLIT": 2, "BN": 32}
        for bk in (64, 128):
            cfg = legal_config({**base, "BK": bk, "span": 1}, 352, bits, plan)
            assert cfg["BK"] == bk
            y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits, plan, a, b, 2.0,
                            config={**base, "BK": bk, "span": 1})
            assert rel_err(y, want) < 1e-5, (group, bk)
        assert legal_config({**base, "BK": 64, "span": 0}, 352, bits, plan)["BK"] == group
        assert legal_config({**base, "BM": 16, "BK": 64, "span": 1}, 352, bits, plan)["BK"] == group
        assert not plan.locks.any()


@pytest.mark.parametrize("k, n, group", [(160, 32, 64), (96, 224, -1), (288, 64, 96)])
def test_odd_shapes(k, n, group):
    """A last group shorter than the others, one group per channel, a group no power-of-two tile divides
    (the kernel falls back to the per-row gather); N not a multiple of the column block."""
    for bits in (3, 4):
        p, x, a, b, want = case(k, n, bits, group, group != -1, False, 2, torch.float32, seed=k + bits)
        y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits,
                        plan_gemv(p["qweight"], p["g_idx"], bits, group), a, b, 2.0)
        assert rel_err(y, want) < 1e-5


def test_without_lora_and_with_fp32_adapter_on_half_input():
    p, x, _, _, want = case(128, 64, 4, 32, True, False, 1, torch.float16, seed=3, lora=False)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 32)
    y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan)
    assert rel_err(y, want) < TOL[torch.float16]
    a, b = torch.randn(4, 128, device=DEVICE) * 0.1, torch.randn(64, 4, device=DEVICE) * 0.1  # fp32 LoRA, r=4
    y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 0.5)
    want = want + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    assert rel_err(y, want) < TOL[torch.float16]


def test_repacked_plan_reads_a_sorted_copy_and_keeps_the_original():
    p = random_packed(128, 64, 2, 32, True, False, 1, DEVICE)
    before = p["qweight"].clone()
    plan = plan_gemv(p["qweight"], p["g_idx"], 2, 32)
    assert plan.sorted and plan.perm is not None and plan.qweight.data_ptr() != p["qweight"].data_ptr()
    assert torch.equal(p["qweight"], before)
    plain = random_packed(128, 64, 2, 32, False, False, 1, DEVICE)
    plan = plan_gemv(plain["qweight"], plain["g_idx"], 2, 32)
    assert plan.sorted and plan.perm is None and plan.qweight is plain["qweight"]  # no copy without act-order


def test_too_many_rows():
    p = random_packed(64, 32, 4, 32, False, False, 1, DEVICE)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 32)
    with pytest.raises(ValueError, match="at most 16"):
        gemv_triton(torch.randn(17, 64, device=DEVICE), p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan)


def test_no_room_for_the_act_order_copy_falls_back_to_the_gather(monkeypatch):
    p, x, a, b, want = case(128, 64, 4, 32, True, False, 1, torch.float32, seed=4)
    monkeypatch.setattr(gemv, "room_for_copy", lambda qweight: False)
    with pytest.warns(UserWarning, match="too little GPU memory"):
        plan = plan_gemv(p["qweight"], p["g_idx"], 4, 32)
    assert not plan.sorted and plan.qweight is p["qweight"]
    y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 2.0)
    assert rel_err(y, want) < 1e-5


@contextlib.contextmanager
def tuned_table_file(monkeypatch, path, configs: dict):
    """Inside the block the kernels read their tuned table from `path` (GPTQLORA_GEMV_CONFIGS), written with
    `configs`, and pick every config afresh; after it, the shipped table again."""
    path.write_text(json.dumps({"configs": configs}))
    monkeypatch.setenv(gemv.TUNED_ENV, str(path))
    monkeypatch.setattr(gemv, "_CONFIGS", {})
    monkeypatch.setattr(gemv, "_M1_CONFIGS", {})
    gemv.tuned_table.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv(gemv.TUNED_ENV)
        gemv.tuned_table.cache_clear()


def test_tuned_table_overrides_the_heuristic_and_stays_legal(tmp_path, monkeypatch):
    """A sweep's table (GPTQLORA_GEMV_CONFIGS) replaces the heuristic for its shapes only; a BK that does not
    divide the group is cut to one that does, and the results are unchanged."""
    p, x, a, b, want = case(256, 64, 4, 64, True, False, 1, torch.float32, seed=11)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64)
    path = tmp_path / "configs.json"
    with tuned_table_file(monkeypatch, path, {gemv.tuned_key(4, 1, 256, 64, True): {"BN": 32, "BK": 128, "SPLIT": 2,
                                                                                      "num_warps": 2}}):
        cfg = pick_config(1, 256, 64, 4, plan)
        assert (cfg["BN"], cfg["BK"], cfg["SPLIT"], cfg["num_warps"]) == (32, 64, 2, 2)
        assert pick_config(3, 256, 64, 4, plan)["BN"] == gemv.heuristic_config(3, 256, 64, 4, plan)["BN"] == 128  # M = 3 is another key: the heuristic
        y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 2.0)
        assert rel_err(y, want) < 1e-5 and not plan.locks.any()
        path.write_text(json.dumps({"configs": {"4,1,256,64,sorted": {"BLOCK": 3}}}))
        gemv.tuned_table.cache_clear()
        with pytest.raises(ValueError, match="unknown gemv config fields"):
            gemv.tuned_table()


@pytest.mark.parametrize("m,split", [(1, 20), (5, 10)])
def test_split_k_sums_more_partials_than_one_load_takes(m, split):
    """The last program of a column block sums the partials CH at a time (16 at M = 1, 4 above); a split
    count past one chunk must still add every partial once, and leave the counters at zero."""
    p, x, a, b, want = case(640, 48, 4, 32, True, False, m, torch.float32, seed=split)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 32)
    cfg = {**pick_config(m, 640, 48, 4, plan), "SPLIT": split, "BK": 32, "BN": 16}
    y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 2.0, config=cfg)
    assert legal_config(cfg, 640, 4, plan)["SPLIT"] == split
    assert rel_err(y, want) < 1e-5
    assert not plan.locks.any()


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("widths", [(64, 32, 32), (96, 160)], ids=["q|k|v", "gate|up"])
def test_siblings_side_by_side_take_their_own_lora(m, widths):
    """Two or three projections in one launch (`bounds`): each column block uses its own projection's rows
    of the stacked A; the result equals each projection computed alone (split-K on)."""
    parts = [case(128, n, 4, 32, False, False, m, torch.float32, seed=20 + i) for i, n in enumerate(widths)]
    x = parts[0][1]
    cat = {f: torch.cat([p[f] for p, *_ in parts], dim=1) for f in ("qweight", "zeros", "scales")}
    a = [pa for _, _, pa, _, _ in parts]
    b = [pb for _, _, _, pb, _ in parts]
    ends = [sum(widths[:i + 1]) for i in range(len(widths))]
    bounds = (ends[0], ends[1] if len(widths) == 3 else ends[-1])
    g_idx = parts[0][0]["g_idx"]
    plan = plan_gemv(cat["qweight"], g_idx, 4, 32)
    for cfg in (None, {"SPLIT": 2, "BN": 64}):
        y = gemv_triton(x, cat["qweight"], cat["zeros"], cat["scales"], g_idx, 4, plan, a, b, 2.0, config=cfg,
                        bounds=bounds)
        want = torch.cat([x.double() @ p["w64"].to(DEVICE) + 2.0 * (x.double() @ pa.double().t()) @ pb.double().t()
                          for p, _, pa, pb, _ in parts], dim=1)
        assert rel_err(y, want) < 1e-5 and not plan.locks.any()
    with pytest.raises(ValueError, match="LoRA A"):
        gemv_triton(x, cat["qweight"], cat["zeros"], cat["scales"], g_idx, 4, plan, a[:1], b[:1], 2.0, bounds=bounds)
    wrong = gemv_triton(x, cat["qweight"], cat["zeros"], cat["scales"], g_idx, 4, plan, a[0], torch.cat(b), 2.0)
    assert rel_err(wrong, want) > 1e-3  # without bounds every column takes the first projection's A

