"""SpQR siblings (q|k|v, gate|up) side by side for one tensor-core launch (nn/spqr_siblings.py), on the CPU:
the concatenated plan, run through the kernel's emulation, gives each sibling's dense output; siblings that
cannot share a launch get None; the adapter hands all siblings' outputs out from one call of the base type's
`decode_group`. The launch itself runs on the GPU only (bench/gemv_mma_probe.py)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gptqlora.adapters import GPTQLoraConfig, get_peft_model
from gptqlora.formats.spqr import SpQRSpec, decode_scales, decode_stats
from gptqlora.kernels import gemv_mma
from gptqlora.kernels.spqr import unpack_along_n
from gptqlora.nn import spqr_siblings
from gptqlora.nn.spqr_linear import SpQRLinear

_spec = importlib.util.spec_from_file_location("spqr_kernel_tests", Path(__file__).parents[1] / "kernels" / "test_spqr_kernel.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
random_spqr = _mod.random_spqr  # the kernel tests' random SpQR tensors (no solver)

K = 256


def siblings(widths=(64, 32, 32), act_order=True, same_order=True, stat_bits=(3, 3, 3)):
    layers = []
    for i, n in enumerate(widths):
        t = random_spqr(k=K, n=n, bits=3, frac=0.03, seed=i, act_order=act_order, stat_bits=stat_bits[i])
        buffers = dict(zip(t.__dataclass_fields__, t.as_tuple()))
        if same_order and layers:
            buffers["g_idx"] = layers[0].g_idx.clone()  # one input, one Hessian: one act-order row order
        layers.append(SpQRLinear.from_packed(SpQRSpec(K, n, 3, 16), buffers))
    return layers


def emulated(lead: SpQRLinear, plan, x: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic (gemv_mma.emulate) on the leader's concatenated buffers, statistics decoded as
    the kernel decodes them."""
    (slot, group), _, widths = plan
    n = sum(widths)
    st = lead.group_stats.float()
    scales = decode_scales(unpack_along_n(lead.group_scales_code, lead.stat_bits, n), st[0], st[1])
    zeros = decode_stats(unpack_along_n(lead.group_zeros_code, lead.stat_bits, n), st[2], st[3])
    return gemv_mma.emulate(x, lead.group_frag, zeros, scales, slot, group, lead.mma_perm,
                            outliers=(lead.group_o_vals, lead.group_o_pos, lead.group_o_rows, lead.group_o_offs))


@pytest.mark.parametrize("widths", [(64, 32, 32), (32, 96)])
@pytest.mark.parametrize("act_order", [True, False])
def test_siblings_side_by_side_give_each_layers_output(monkeypatch, widths, act_order):
    monkeypatch.setenv(gemv_mma.ENV, "1")  # plans on the CPU too (their layout is what is checked)
    layers = siblings(widths, act_order)
    plan = spqr_siblings.group_plan(layers)
    assert plan is not None and plan[2] == widths
    cum = [sum(widths[:i + 1]) for i in range(len(widths))]
    assert plan[1] == (cum[0], cum[1] if len(widths) == 3 else cum[-1])
    lead = layers[0]
    assert lead.group_frag.shape[0] * 16 == sum(widths) and lead.group_o_rows.shape == (sum(widths) + 1,)
    assert int(lead.group_o_rows[-1]) == lead.group_o_vals.shape[0] == sum(int(m.outlier_rows[-1]) for m in layers)
    x = torch.randn(3, K)
    want = torch.cat([x.double() @ m.dequantize(torch.float32).double() for m in layers], dim=-1)
    torch.testing.assert_close(emulated(lead, plan, x).double(), want, rtol=1e-4, atol=1e-4)
    assert spqr_siblings.group_plan(layers) is plan  # built once
    with torch.no_grad():
        layers[1].outlier_values.mul_(-2)  # a sibling's tensor changed in place: the shared plan follows
    plan = spqr_siblings.group_plan(layers)
    want = torch.cat([x.double() @ m.dequantize(torch.float32).double() for m in layers], dim=-1)
    torch.testing.assert_close(emulated(lead, plan, x).double(), want, rtol=1e-4, atol=1e-4)
    assert not any(name.startswith("group_") for name in lead.state_dict())  # checkpoints stay SpQR's


def test_siblings_that_cannot_share_a_launch_decode_alone(monkeypatch):
    monkeypatch.setenv(gemv_mma.ENV, "1")
    assert spqr_siblings.group_plan(siblings(same_order=False)) is None  # two act-order row orders
    assert spqr_siblings.group_plan(siblings(stat_bits=(3, 4, 3))) is None  # statistics of two widths
    monkeypatch.setenv(gemv_mma.ENV, "0")
    assert spqr_siblings.group_plan(siblings()) is None  # no tensor-core plan: nothing to put side by side
    monkeypatch.setenv(gemv_mma.ENV, "1")
    monkeypatch.setenv(spqr_siblings.ENV, "1")
    layers = siblings()
    a = [torch.zeros(4, K) for _ in layers]
    b = [torch.zeros(m.out_features, 4) for m in layers]
    assert spqr_siblings.decode_group(layers, torch.randn(1, K), a, b, 1.0) is None  # the launch is CUDA's


class Attention(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = layers
        self.norm = torch.nn.LayerNorm(K)  # a parameter: PEFT reads the device from one


def test_adapter_takes_every_siblings_output_from_one_group_call(monkeypatch):
    """Decoding, the first sibling called asks its base type's `decode_group` for all three outputs and the
    others take theirs from it (as GPTQ's siblings); where it says None each layer decodes alone."""
    pm = get_peft_model(Attention(siblings()), GPTQLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=["q_proj", "k_proj", "v_proj"],
                                                              task_type=None)).eval()
    attn = pm.base_model.model
    assert attn.q_proj.siblings is attn.v_proj.siblings is not None
    calls = []

    def fake(bases, x, lora_a, lora_b, scaling):
        calls.append((len(bases), len(lora_a), scaling))
        return tuple(torch.full((*x.shape[:-1], m.out_features), float(i)) for i, m in enumerate(bases))

    monkeypatch.setattr(SpQRLinear, "decode_group", staticmethod(fake))
    x = torch.randn(2, K)
    with torch.no_grad():
        ys = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert calls == [(3, 3, attn.q_proj.scaling["default"])]
    assert [float(y.unique()) for y in ys] == [0.0, 1.0, 2.0]
    monkeypatch.setattr(SpQRLinear, "decode_group", staticmethod(lambda *a: calls.append("none")))
    with torch.no_grad():
        y = attn.k_proj(x)  # each alone: the layer's own decode path
    want = x @ attn.k_proj.base_layer.dequantize(torch.float32) + attn.k_proj.lora_B["default"](
        attn.k_proj.lora_A["default"](x)) * attn.k_proj.scaling["default"]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_prepare_decode_builds_the_siblings_plan_before_compiling(monkeypatch):
    """Under torch.compile a plan cannot be built (the siblings would decode one by one): prepare_decode
    builds it where GPTQLORA_SPQR_SIBLINGS=1 asks for it, and not otherwise."""
    from gptqlora.inference import prepare_decode

    monkeypatch.setenv(gemv_mma.ENV, "1")
    for wanted in ("0", "1"):
        monkeypatch.setenv(spqr_siblings.ENV, wanted)
        pm = get_peft_model(Attention(siblings()), GPTQLoraConfig(r=4, lora_dropout=0.0, task_type=None,
                                                                  target_modules=["q_proj", "k_proj", "v_proj"]))
        prepare_decode(pm, 1)
        lead = pm.base_model.model.q_proj.base_layer
        assert (getattr(lead, "_spqr_group", None) is not None) == (wanted == "1")
