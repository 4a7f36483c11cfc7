"""The tensor-core decode kernel's layout and plan (kernels/gemv_mma.py) on the CPU: the fragment copy holds
every code where PTX's mma.m16n8k16 A table puts it, the kernel's arithmetic (emulated in torch) equals the
fp64 layer, the block picker's choices are legal, and a plan for it falls back to the dense path for calls
the kernel cannot take. The kernel itself runs on the GPU only (bench/gpu_check_decode.py's mma section)."""

import pytest
import torch

from gptqlora.formats.gptq import unpack_rows
from gptqlora.kernels import gemv_mma
from gptqlora.kernels.gemv import gemv_triton, plan_gemv
from packed import random_packed


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("k,n", [(128, 16), (256, 48), (512, 32)])
def test_pack_puts_each_code_where_the_fragment_table_reads_it(bits, k, n):
    k = k * (4 // bits)  # whole loads of 2-bit rows (128)
    codes = torch.randint(0, 2**bits, (k, n), generator=torch.Generator().manual_seed(k + n + bits))
    frag = gemv_mma.pack(codes, bits)
    assert frag.shape == (n // 16, k // gemv_mma.rows_per_load(bits), 32, 4) and frag.dtype == torch.int32
    assert torch.equal(gemv_mma.unpack_codes(frag, bits), codes.long())


def test_lane_places_cover_each_tile_cell_once():
    for bits in (2, 4):
        s, kk, nn = gemv_mma.lane_places(bits)
        cells = {(int(a), int(b), int(c)) for a, b, c in zip(s.flatten(), kk.flatten(), nn.flatten())}
        assert len(cells) == 32 * (32 // bits) == (4 // bits) * 16 * 16  # every (k-step, row, column) once


@pytest.mark.parametrize("bits,group,act", [(4, 128, True), (4, 32, False), (2, 64, True), (2, 256, False)])
def test_emulated_kernel_equals_the_fp64_layer(bits, group, act):
    k, n = 512, 64
    p = random_packed(k, n, bits, group, act, False, seed=bits * 100 + group)
    plan = plan_gemv(p["qweight"], p["g_idx"], bits, group, mma=True)
    assert plan.qweight.dim() == 4 and (plan.perm is not None) == act
    x = torch.randn(3, k, dtype=torch.float64)
    a, b = torch.randn(8, k, dtype=torch.float64) * 0.1, torch.randn(n, 8, dtype=torch.float64) * 0.1
    y = gemv_mma.emulate(x, plan.qweight, p["zeros"], p["scales"], bits, plan.group, plan.perm, a, b, 2.0)
    want = x @ p["w64"] + 2.0 * (x @ a.t()) @ b.t()
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)  # fp32 sums, as the kernel


def test_pack_gptq_sorts_act_order_rows_into_groups():
    p = random_packed(256, 32, 4, 64, True, False, seed=3)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64, mma=True)
    codes = gemv_mma.unpack_codes(plan.qweight, 4)
    assert torch.equal(codes, unpack_rows(p["qweight"], 4)[plan.perm.long()].long())
    assert torch.equal(p["g_idx"][plan.perm.long()].long(), torch.arange(256) // 64)


def test_layers_the_kernel_cannot_read_keep_the_triton_plan():
    p = random_packed(256, 40, 4, 64, False, False, seed=4)  # N not in 16-column tiles
    assert plan_gemv(p["qweight"], p["g_idx"], 4, 64, mma=True).qweight.dim() == 2
    p = random_packed(256, 32, 8, 64, False, False, seed=5)  # 8 bit
    assert plan_gemv(p["qweight"], p["g_idx"], 8, 64, mma=True).qweight.dim() == 2
    p = random_packed(256, 32, 3, 64, True, False, seed=5)  # 3 bit: its codes in 4-bit slots, rows in group order
    plan = plan_gemv(p["qweight"], p["g_idx"], 3, 64, mma=True)
    codes = unpack_rows(p["qweight"], 3)[plan.perm.long()]
    assert plan.qweight.dim() == 4 and torch.equal(gemv_mma.unpack_codes(plan.qweight, 4), codes.long())
    assert not gemv_mma.eligible(4, 256, 32, 8, False)  # groups of half a k-step
    assert not gemv_mma.eligible(4, 384, 32, 48, False)  # 48-row groups: no split of whole loads holds or fits one


def test_calls_the_kernel_cannot_take_get_the_dense_result():
    """On the CPU (or fp32 x, or an adapter of another dtype) a gemv_mma plan computes through the dense path."""
    k, n = 256, 64
    p = random_packed(k, n, 4, 64, True, False, seed=7)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64, mma=True)
    x = torch.randn(2, k)
    a, b = torch.randn(4, k) * 0.1, torch.randn(n, 4) * 0.1
    y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a, b, 0.5)
    want = (x.double() @ p["w64"] + 0.5 * (x.double() @ a.double().t()) @ b.double().t()).float()
    assert torch.allclose(y, want, rtol=1e-4, atol=1e-4)
    # siblings side by side: each projection's adapter on its columns
    bounds = (32, 48)
    a_s = [torch.randn(4, k) * 0.1 for _ in range(3)]
    b_s = [torch.randn(w, 4) * 0.1 for w in (32, 16, 16)]
    y = gemv_triton(x, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, plan, a_s, b_s, 0.5, bounds=bounds)
    base = x.double() @ p["w64"]
    for (lo, hi), a_, b_ in zip(((0, 32), (32, 48), (48, 64)), a_s, b_s):
        base[:, lo:hi] += 0.5 * (x.double() @ a_.double().t()) @ b_.double().t()
    assert torch.allclose(y, base.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,n,bits,group", [(4096, 4096, 4, 128), (11008, 4096, 4, 128), (4096, 22016, 4, 128),
                                            (4096, 12288, 2, 64), (11008, 4096, 2, 64), (4096, 4096, 4, 4096),
                                            (5120, 13824, 4, 128), (8192, 1024, 2, 32)])
@pytest.mark.parametrize("m", [1, 8, 16])
def test_block_picker_is_legal_for_llama_shapes(k, n, bits, group, m):
    bounds = (n // 3, 2 * n // 3) if n == 12288 else None
    cfg = gemv_mma.pick_config(m, k, n, bits, group, 132, bounds)
    assert cfg is not None
    cols, kc = cfg["WARPS"] * cfg["NT"] * 16, cfg["KC"]
    rl = gemv_mma.rows_per_load(bits)
    assert k % kc == 0 and kc % rl == 0 and (kc % group == 0 or group % kc == 0)
    assert kc // min(kc, group) <= 8 and cfg["NT"] * kc // rl <= 8
    assert bounds is None or (bounds[0] % cols == 0 and bounds[1] % cols == 0)
    assert cfg["NM"] == (1 if m <= 8 else 2)
    blocks = -(-n // cols) * (k // kc)
    assert blocks >= 132 or k // kc == k // (rl * 1)  # enough blocks, or as many splits as there can be


@pytest.mark.parametrize("narrow", ["0", "1"])
def test_narrow_blocks_take_the_fewest_splits_at_2_to_8_rows(monkeypatch, narrow):
    monkeypatch.setenv(gemv_mma.NARROW_ENV, narrow)
    for m in (1, 2, 8, 9):
        for k, n, bits, group, kc in ((4096, 4096, 4, 128, 512), (11008, 4096, 4, 128, 256),
                                      (4096, 12288, 2, 64, 512), (4096, 4096, 4, 32, 256)):
            cfg = gemv_mma.pick_config(m, k, n, bits, group, 132)
            if narrow == "1" and 1 < m <= 8:  # 128 columns, the largest KC that fits
                assert (cfg["WARPS"], cfg["NT"], cfg["KC"]) == (8, 1, kc)
            else:
                assert cfg == gemv_mma.pick_config(m, k, n, bits, group, 132) and cfg["NT"] == 2
    # sibling bounds off the 128-column grid: the usual picker
    monkeypatch.setenv(gemv_mma.NARROW_ENV, "1")
    assert gemv_mma.pick_config(8, 4096, 384, 4, 128, 132, (64, 320))["WARPS"] * 16 <= 64


def test_no_block_fits_an_unaligned_layer():
    assert gemv_mma.pick_config(1, 4096 + 32, 4096, 4, 128, 132) is None  # K: no whole number of 64-row loads


def test_variants_differ_by_their_constants(monkeypatch):
    monkeypatch.delenv(gemv_mma.PDL_ENV, raising=False)
    monkeypatch.delenv(gemv_mma.TAIL_ENV, raising=False)
    cfg = {"WARPS": 4, "NT": 2, "KC": 256, "NM": 1}
    one = gemv_mma.defines(dict(cfg, PDL=0), 4, 128, torch.bfloat16, torch.float16, True, torch.float32)
    assert dict(one) == {"BITS": 4, "XF16": 0, "SF16": 1, "NM": 1, "NT": 2, "WARPS": 4, "KC": 256, "GSTEPS": 8,
                         "HAS_PERM": 1, "HAS_LORA": 1, "LORA_F32": 1, "MAX_R": gemv_mma.MAX_R, "FZ": 0, "OUTLIERS": 0,
                         "UPRE": 1, "TAIL": 0, "SB": 0, "SG": 1, "OSTEP": gemv_mma.OSTEP, "PDL": 0,
                         "SSTATS": 0, "OPRE": 0}
    assert dict(gemv_mma.defines(dict(cfg, UPRE=0), 4, 128, torch.bfloat16, torch.float16, True, torch.float32))["UPRE"] == 0
    assert dict(gemv_mma.defines(cfg, 4, 128, torch.bfloat16, torch.float16, True, None))["UPRE"] == 0  # no adapter
    assert dict(gemv_mma.defines(cfg, 2, 1024, torch.float16, torch.bfloat16, False, None))["GSTEPS"] == 16
    assert "__global__ void __launch_bounds__(WARPS * 32)" in gemv_mma.SOURCE.read_text()
    monkeypatch.setenv(gemv_mma.TAIL_ENV, "1")  # the environment's TAIL, unless the config names one
    assert dict(gemv_mma.defines(cfg, 4, 128, torch.bfloat16, torch.float16, True, None))["TAIL"] == 1
    assert dict(gemv_mma.defines(dict(cfg, TAIL=0), 4, 128, torch.bfloat16, torch.float16, True, None))["TAIL"] == 0


def test_float_zeros_fold_per_group():
    """Float zeros (a QA-LoRA merge's): the fragments hold q, and s * z * Σx per group comes off (FZ)."""
    p = random_packed(512, 48, 4, 64, True, True, seed=8)
    plan = plan_gemv(p["qweight"], p["g_idx"], 4, 64, mma=True, float_zeros=True)
    assert plan.qweight.dim() == 4
    x = torch.randn(2, 512, dtype=torch.float64)
    y = gemv_mma.emulate(x, plan.qweight, p["zeros"], p["scales"], 4, 64, plan.perm)
    assert torch.allclose(y, x @ p["w64"], rtol=1e-5, atol=1e-5)
    cfg = {"WARPS": 4, "NT": 1, "KC": 128, "NM": 1}
    assert dict(gemv_mma.defines(cfg, 4, 64, torch.bfloat16, torch.float16, True, None, True, True))["FZ"] == 1


@pytest.mark.parametrize("bits,group,stat_group", [(2, 16, 16), (3, 16, 16), (4, 16, 16), (4, 64, 16), (3, 128, 16),
                                                   (4, 64, 64), (3, 128, 64)])
def test_spqr_layer_plans_its_codes_in_slots_with_decoded_statistics(bits, group, stat_group, monkeypatch):
    """A SpQR layer's tensor-core plan: 3-bit codes in 4-bit slots, the statistics' steps and bases for the kernel
    to decode the layer's codes with, the outliers in packed-row order; emulated (statistics decoded as the
    kernel does), it equals the layer's dense weight. Groups of 64 and 128 and statistics groups of 64 too: the
    4.0-bit mixes of docs/results.md section 3 (session 25) have 4-bit g64 and 3-bit g128 layers."""
    from test_spqr_kernel import random_spqr

    from gptqlora.formats.spqr import SpQRSpec, decode_scales, decode_stats
    from gptqlora.kernels.spqr import unpack_along_n
    from gptqlora.nn.spqr_linear import SpQRLinear

    t = random_spqr(k=256, n=64, bits=bits, group=group, stat_group=stat_group, frac=0.03, seed=bits)
    layer = SpQRLinear.from_packed(SpQRSpec(256, 64, bits, group, 3, stat_group),
                                   dict(zip(t.__dataclass_fields__, t.as_tuple())))
    assert layer.mma_plan() is None  # not asked for
    monkeypatch.setenv(gemv_mma.ENV, "1")
    slot, planned = layer.mma_plan()
    assert (slot, planned) == (4 if bits == 3 else bits, group) and layer.mma_frag.dim() == 4

    def emulated(x):
        st = layer.mma_stats.float()  # (4, G, S): what the kernel reads beside the codes
        assert layer.mma_stats.dtype == torch.float16 and st.shape[0] == 4
        scales = decode_scales(unpack_along_n(layer.scales_code, layer.stat_bits, 64), st[0], st[1])
        zeros = decode_stats(unpack_along_n(layer.zeros_code, layer.stat_bits, 64), st[2], st[3])
        return gemv_mma.emulate(x, layer.mma_frag, zeros, scales, slot, planned, layer.mma_perm,
                                outliers=(layer.mma_o_vals, layer.mma_o_pos, layer.outlier_rows, layer.mma_o_offs))

    x = torch.randn(3, 256)
    want = x.double() @ layer.dequantize(torch.float32).double()
    assert torch.allclose(emulated(x).double(), want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        layer.outlier_values.mul_(-3)  # changed in place (a load_state_dict copies so): the plan follows
    layer.mma_plan()
    want = x.double() @ layer.dequantize(torch.float32).double()
    assert torch.allclose(emulated(x).double(), want, rtol=1e-4, atol=1e-4)
    assert layer.small_m(x) is None  # on the CPU nothing decodes through a kernel: forward's dense path
    assert "mma_frag" not in layer.state_dict()


def _nvrtc_or_skip():
    try:
        gemv_mma._nvrtc()
    except OSError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("bits,x_dtype,perm,lora,nm,fz,outliers,upre", [
    (4, torch.bfloat16, True, torch.float32, 1, False, False, 1),
    (4, torch.bfloat16, True, torch.float32, 1, False, False, 0),  # the adapter's u per block (session 16's way)
    (4, torch.bfloat16, True, torch.float32, 1, False, False, 2),  # u Bᵀ where the cells are stored
    (2, torch.float16, True, torch.float16, 2, False, True, 2),
    (2, torch.float16, False, None, 2, False, False, 1),
    (4, torch.bfloat16, True, torch.bfloat16, 2, True, True, 1),  # float zeros, outliers, a bf16 adapter
])
def test_cuda_source_compiles_to_tensor_core_ptx(bits, x_dtype, perm, lora, nm, fz, outliers, upre):
    """NVRTC (the test extra's wheel on the CPU; PyTorch's on a GPU machine) compiles each kind of variant,
    and the PTX multiplies on the tensor cores."""
    _nvrtc_or_skip()
    cfg = {"WARPS": 4, "NT": 2, "KC": 256 * (4 // bits), "NM": nm, "UPRE": upre}
    consts = gemv_mma.defines(cfg, bits, 64 if fz else 128, x_dtype, torch.float16, perm, lora, fz, outliers)
    code = gemv_mma.ptx(consts, "sm_90")
    kind = "bf16" if x_dtype == torch.bfloat16 else "f16"
    assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32".encode() in code
    assert b".entry gemv_mma" in code and b"ld.global.nc.L1::no_allocate.v4.u32" in code


def test_precomputed_u_leaves_the_blocks_without_a_reads():
    """With UPRE (the default) the kernel takes u = x Aᵀ computed once (kernels/lora_u.py): its blocks do none
    of u's warp reductions, so the PTX has fewer lane shuffles than the variant that computes each split's
    share of u in every block (the Σx per group's shuffles are in both)."""
    _nvrtc_or_skip()
    cfg = {"WARPS": 8, "NT": 2, "KC": 256, "NM": 1}
    shuffles = [gemv_mma.ptx(gemv_mma.defines(dict(cfg, UPRE=u), 4, 128, torch.bfloat16, torch.float16, True,
                                              torch.float32), "sm_90").count(b"shfl.sync.bfly") for u in (0, 1)]
    assert shuffles[0] > shuffles[1] > 0, shuffles


def test_emulation_makes_its_tensors_on_the_codes_device():
    """The dense fallback runs emulate on the GPU (a call the kernel cannot take); every tensor it makes must
    be on the fragments' device (session 16's first GPU run failed on a CPU-made index). Meta tensors stand in
    for CUDA here: any tensor made on the CPU cannot mix with them."""
    k, n = 256, 32
    frag = gemv_mma.pack(torch.randint(0, 16, (k, n)), 4).to("meta")
    zeros, scales = torch.rand(4, n).to("meta"), torch.rand(4, n).half().to("meta")
    x, perm = torch.randn(2, k).to("meta"), torch.randperm(k).int().to("meta")
    vals, cols = torch.rand(5).half(), torch.tensor([3, 9, 1, 4, 200]).short()
    rows = torch.tensor([0] * 30 + [2, 5, 5]).int()
    packed = gemv_mma.pack_outliers(vals, cols, rows, torch.randperm(k).int(), k)
    y = gemv_mma.emulate(x, frag, zeros, scales, 4, 64, perm, outliers=tuple(t.to("meta") for t in packed))
    assert y.device.type == "meta" and y.shape == (2, n)


@pytest.mark.parametrize("act", [True, False])
def test_outliers_in_packed_order_give_each_split_its_own(act):
    """pack_outliers: each row's entries sorted by packed-row position, and for any KC (a multiple of OSTEP) the
    offsets give split s exactly the row's entries in packed rows [s KC, (s + 1) KC), as gemv_mma.cu reads them;
    the splits together hold every outlier once, with its value and x row."""
    k, n = 512, 24
    g = torch.Generator().manual_seed(5)
    per_row = torch.randint(0, 9, (n,), generator=g)
    per_row[3] = 0  # a row without outliers
    rows = torch.cat([torch.zeros(1, dtype=torch.int64), per_row.cumsum(0)]).int()
    cols = torch.cat([torch.randperm(k, generator=g)[:c] for c in per_row.tolist()]).short()
    vals = torch.randn(cols.shape[0], generator=g).half()
    perm = torch.randperm(k, generator=g).int() if act else None
    o_vals, o_pos, o_rows, offs = gemv_mma.pack_outliers(vals, cols, rows, perm, k)
    assert o_pos.dtype == offs.dtype == torch.int16 and offs.shape == (n, k // gemv_mma.OSTEP + 1)
    where = torch.argsort(perm.long()) if act else torch.arange(k)  # x row -> packed position
    for kc in (64, 128, 256):
        for r in range(n):
            base, seen = int(o_rows[r]), {}
            for s in range(k // kc):
                lo = base + int(offs[r, s * kc // gemv_mma.OSTEP])
                hi = base + int(offs[r, (s + 1) * kc // gemv_mma.OSTEP])
                pos = o_pos[lo:hi].long()
                assert ((pos >= s * kc) & (pos < (s + 1) * kc)).all() and (pos.diff() > 0).all()
                seen.update(zip(pos.tolist(), o_vals[lo:hi].tolist()))
            own = slice(int(rows[r]), int(rows[r + 1]))
            want = {int(where[c]): float(v) for c, v in zip(cols[own].long(), vals[own])}
            assert seen == want


def test_outliers_need_k_in_int16_and_whole_steps():
    rows = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 64"):
        gemv_mma.pack_outliers(torch.zeros(0).half(), torch.zeros(0).short(), rows, None, 100)
    with pytest.raises(ValueError, match="below 2"):
        gemv_mma.pack_outliers(torch.zeros(0).half(), torch.zeros(0).short(), rows, None, 2**15)


@pytest.mark.parametrize("stat_bits", [2, 3, 4, 8])
def test_spqr_statistics_decoded_in_the_kernel_compile(stat_bits):
    """SB: SpQR's statistics decoded from their codes in the kernel (3-bit codes straddle words), beside the
    outliers and an fp32 adapter, as SpQRLinear's plan runs it; rounded to fp16 with cvt.rn, no FMA."""
    _nvrtc_or_skip()
    cfg = {"WARPS": 8, "NT": 1, "KC": 128, "NM": 1, "UPRE": 1}
    consts = gemv_mma.defines(cfg, 4, 16, torch.bfloat16, torch.int32, True, torch.float32, False, True, stat_bits, 16)
    assert dict(consts)["SB"] == stat_bits and dict(consts)["FZ"] == 0
    code = gemv_mma.ptx(consts, "sm_90")
    assert b"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in code and b"cvt.rn.f16.f32" in code
    assert b"mul.rn.f32" in code and b"add.rn.f32" in code


@pytest.mark.parametrize("nm,warps", [(1, 8), (2, 4)])
def test_the_last_splits_four_cell_sum_compiles(nm, warps):
    """TAIL 1 (off by default until GPU-run): the last split sums 4 cells a thread at once; its loads bypass
    L1 as TAIL 0's do, and there are more of them in flight."""
    _nvrtc_or_skip()
    cfg = {"WARPS": warps, "NT": 1, "KC": 256, "NM": nm, "UPRE": 1}
    ptx = [gemv_mma.ptx(gemv_mma.defines(dict(cfg, TAIL=t), 4, 128, torch.bfloat16, torch.float16, True,
                                         torch.float32), "sm_90") for t in (0, 1)]
    assert ptx[1].count(b"ld.global.cg.f32") > ptx[0].count(b"ld.global.cg.f32") > 0


def test_three_bit_layers_read_four_bit_slots_and_wait_to_be_asked(monkeypatch):
    """3-bit GPTQ layers go through the kernel in 4-bit slots, codes and zeros (`slot_bits`, `slot_zeros`); the
    batch-2+ default takes only the widths timed through it (2 and 4 bit), GPTQLORA_GEMV_MMA=1 all three."""
    from gptqlora.formats.gptq import pack_cols, unpack_cols

    assert [gemv_mma.slot_bits(b) for b in (2, 3, 4, 8)] == [2, 4, 4, None]
    z = torch.randint(0, 8, (4, 64), generator=torch.Generator().manual_seed(0))
    slots = gemv_mma.slot_zeros(pack_cols(z, 3), 3, 64)
    assert slots.shape == (4, 64 * 4 // 32) and torch.equal(unpack_cols(slots, 4, 64), z)
    four, fz = pack_cols(z, 4), torch.rand(4, 64)
    assert gemv_mma.slot_zeros(four, 4, 64) is four and gemv_mma.slot_zeros(fz, 3, 64) is fz
    monkeypatch.delenv(gemv_mma.ENV, raising=False)
    assert [gemv_mma.wanted(8, b) for b in (2, 3, 4)] == [True, False, True] and not gemv_mma.wanted(1, 4)
    monkeypatch.setenv(gemv_mma.ENV, "1")
    assert gemv_mma.wanted(1, 3)


def test_the_dependent_launch_waits_before_reading_u_and_its_structs_match_the_driver():
    """PDL (on by default since session 21's A/B): only a variant that takes u computed once (UPRE) may start before
    lora_u ends, and it waits (griddepcontrol.wait) before its cells read u; the launch structs cuLaunchKernelEx
    takes have the driver's layout (CUlaunchAttribute 72 bytes: id, pad, 64-byte value; CUlaunchConfig 56); a
    plan's counters leave U_LOCKS spare for lora_u."""
    import ctypes

    cfg = {"WARPS": 8, "NT": 1, "KC": 256, "NM": 1, "UPRE": 1}
    assert dict(gemv_mma.defines(dict(cfg, PDL=1), 4, 128, torch.bfloat16, torch.float16, True, torch.float32))["PDL"]
    assert not dict(gemv_mma.defines(dict(cfg, PDL=1, UPRE=0), 4, 128, torch.bfloat16, torch.float16, True,
                                     torch.float32))["PDL"]
    assert not dict(gemv_mma.defines(dict(cfg, PDL=1), 4, 128, torch.bfloat16, torch.float16, True, None))["PDL"]
    assert ctypes.sizeof(gemv_mma._LaunchAttribute) == 72 and gemv_mma._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(gemv_mma._LaunchConfig) == 56 and gemv_mma._LaunchConfig.hStream.offset == 32
    assert gemv_mma._LaunchConfig.attrs.offset == 40 and gemv_mma._LaunchConfig.numAttrs.offset == 48
    assert gemv_mma.counters(100).shape == (7 + gemv_mma.U_LOCKS,) and not gemv_mma.counters(100).any()
    _nvrtc_or_skip()
    ptx = [gemv_mma.ptx(gemv_mma.defines(dict(cfg, PDL=p), 4, 128, torch.bfloat16, torch.float16, True,
                                         torch.float32), "sm_90") for p in (0, 1)]
    assert b"griddepcontrol.wait" in ptx[1] and b"griddepcontrol" not in ptx[0]
    assert b"ld.global.cg.f32" in ptx[1]  # u read past the non-coherent path after the wait
    # below sm_90 there is no programmatic launch: the same variant compiles there without the wait
    sm80 = gemv_mma.ptx(gemv_mma.defines(dict(cfg, PDL=1), 4, 128, torch.bfloat16, torch.float16, True, torch.float32),
                        "sm_80")
    assert b"griddepcontrol" not in sm80


def _ptx_shared_bytes(code: bytes) -> int:
    """The static shared memory a PTX kernel declares (`.shared .align A .b8 name[bytes];`)."""
    import re

    return sum(int(n) for n in re.findall(rb"\.shared \.align \d+ \.b8 \S+\[(\d+)\];", code))


@pytest.mark.parametrize("staged,stat_bits", [(1, 3), (2, 3), (2, 2), (2, 8)])
@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096), (1024, 768)])
def test_staged_spqr_statistics_lift_the_eight_group_cap_within_shared_memory(m, k, n, staged, stat_bits):
    """SSTATS (SpQR's default through this kernel): each group's scale and zero decoded once per block into
    shared memory, so a split of 16-row groups is no longer capped at 8 groups (128 rows); SSTATS 2 also stages
    the block's raw code words and second-level values. The pick is legal, at least as long as the registers'
    pick, 256 rows at the 7B's shapes up to 8 rows (3-bit statistics), and the compiled variant (outliers and an
    fp32 adapter, the worst case) declares no more shared memory than `smem_bytes` allows."""
    reg = gemv_mma.pick_config(m, k, n, 4, 16, 132)
    cfg = gemv_mma.pick_config(m, k, n, 4, 16, 132, staged=staged, stat_bits=stat_bits, stat_group=16)
    assert cfg["SSTATS"] == staged and "SSTATS" not in reg
    assert k % cfg["KC"] == 0 and cfg["KC"] >= reg["KC"] and cfg["NT"] * cfg["KC"] // 64 <= 8
    if m <= 8 and k >= 4096 and stat_bits <= 3:
        assert cfg["KC"] == 256
    cols = cfg["WARPS"] * cfg["NT"] * 16
    bound = gemv_mma.smem_bytes(cols, cfg["KC"], 16, cfg["NM"], staged, stat_bits, 16)
    assert bound <= gemv_mma.SMEM_LIMIT
    if m == 8 or n != 4096:
        return  # compiled at the largest and smallest shared memory (M = 16, 1) of the two N = 4096 shapes only
    _nvrtc_or_skip()
    for upre in (0, 1):
        consts = gemv_mma.defines(dict(cfg, UPRE=upre), 4, 16, torch.bfloat16, torch.int32, True, torch.float32,
                                  False, True, stat_bits, 16)
        code = gemv_mma.ptx(consts, "sm_90")
        assert b"ssc" in code and b"szf" in code and (b"scw" in code) == (staged == 2)
        declared = _ptx_shared_bytes(code)
        assert declared <= bound + 16, (declared, bound)  # + s_last and alignment
        assert declared <= gemv_mma.SMEM_LIMIT, declared


def test_statistics_stay_in_registers_when_asked_or_for_gptq(monkeypatch):
    """GPTQ layers keep their statistics per lane (their splits hold at most a few groups); SpQR's staging can
    be turned off (GPTQLORA_GEMV_SSTATS=0, session 21's kernel, for the A/B): the variant then has no staged
    arrays and the 8-group cap."""
    _nvrtc_or_skip()
    cfg = gemv_mma.pick_config(1, 4096, 4096, 4, 128, 132)
    code = gemv_mma.ptx(gemv_mma.defines(cfg, 4, 128, torch.bfloat16, torch.float16, True, torch.float32), "sm_90")
    assert b"ssc" not in code and dict(gemv_mma.defines(cfg, 4, 128, torch.bfloat16, torch.float16, True,
                                                          None))["SSTATS"] == 0
    for value in "012":
        monkeypatch.setenv(gemv_mma.SSTATS_ENV, value)
        assert gemv_mma.sstats() == int(value)
    monkeypatch.setenv(gemv_mma.SSTATS_ENV, "3")  # not a mode: the default
    assert gemv_mma.sstats() == gemv_mma.SSTATS


def test_spqr_layers_take_the_kernel_by_default_on_cuda_only(monkeypatch):
    """SpQR layers plan for this kernel on CUDA unless GPTQLORA_GEMV_MMA=0 (session 22: faster than SpQR's
    Triton path at one row and far faster at 8); on the CPU only when asked (the plan's tests)."""
    monkeypatch.delenv(gemv_mma.ENV, raising=False)
    assert gemv_mma.wanted_spqr("cuda") and gemv_mma.wanted_spqr(torch.device("cuda", 1))
    assert not gemv_mma.wanted_spqr("cpu") and not gemv_mma.wanted_spqr()
    monkeypatch.setenv(gemv_mma.ENV, "0")
    assert not gemv_mma.wanted_spqr("cuda")
    monkeypatch.setenv(gemv_mma.ENV, "1")
    assert gemv_mma.wanted_spqr("cpu")


def test_outlier_offsets_read_early_only_with_outliers(monkeypatch):
    """OPRE (off until GPU-run; GPTQLORA_GEMV_OPRE=1): a SpQR variant reads each column's outlier offsets with
    the statistics' loads and its first entries before the block's barrier. Only variants with outliers carry
    it; it compiles with both statistics modes at M = 1 and 16, no local arrays in the PTX."""
    monkeypatch.setenv(gemv_mma.OPRE_ENV, "1")
    cfg = gemv_mma.pick_config(1, 4096, 4096, 4, 16, 132, staged=2, stat_bits=3, stat_group=16)
    assert dict(gemv_mma.defines(cfg, 4, 16, torch.bfloat16, torch.int32, True, None, False, True, 3, 16))["OPRE"] == 1
    assert dict(gemv_mma.defines(cfg, 4, 16, torch.bfloat16, torch.int32, True, None, False, False, 3, 16))["OPRE"] == 0
    monkeypatch.delenv(gemv_mma.OPRE_ENV)
    assert dict(gemv_mma.defines(cfg, 4, 16, torch.bfloat16, torch.int32, True, None, False, True, 3, 16))["OPRE"] == gemv_mma.OPRE
    _nvrtc_or_skip()
    for staged, m in ((1, 1), (2, 16)):
        cfg = gemv_mma.pick_config(m, 4096, 4096, 4, 16, 132, staged=staged, stat_bits=3, stat_group=16)
        code = [gemv_mma.ptx(gemv_mma.defines(dict(cfg, OPRE=o), 4, 16, torch.bfloat16, torch.int32, True,
                                              torch.float32, False, True, 3, 16), "sm_90") for o in (0, 1)]
        assert code[0] != code[1] and all(b".local" not in c for c in code)
