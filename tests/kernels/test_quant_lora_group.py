"""The fused function over sibling layers (one input, several packed bases and adapters): values and
gradients against a float64 composition with the mask the function drew, Triton and torch paths."""

import pytest
import torch

from gptqlora.kernels.dequant import plan_for
from gptqlora.kernels.lora_dropout import dropout_mask
from gptqlora.kernels.quant_lora import PackedBase, quant_lora_group
from packed import random_packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K = 96


def rel_err(got, ref):
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_group_values_and_gradients(dropout, backend):
    # three siblings of different widths, bit widths, ranks and scalings (as q/k/v of a GQA model can be)
    specs = [(64, 4, 8, 2.0), (32, 3, 4, 0.5), (48, 2, 8, 1.0)]  # (N_i, bits, r_i, s_i)
    g = torch.Generator(device=DEVICE).manual_seed(int(dropout * 10) + len(backend))
    packs = [random_packed(K, n, bits, 32, True, False, i, DEVICE) for i, (n, bits, _, _) in enumerate(specs)]
    bases = [PackedBase(p["qweight"], p["zeros"], p["scales"], p["g_idx"], bits,
                        plan_for(p["g_idx"], 32) if backend == "triton" else None)
             for p, (_, bits, _, _) in zip(packs, specs)]
    x = torch.randn(3, 5, K, device=DEVICE, generator=g, requires_grad=True)
    a = [(torch.randn(r, K, device=DEVICE, generator=g) * 0.1).requires_grad_() for _, _, r, _ in specs]
    b = [(torch.randn(n, r, device=DEVICE, generator=g) * 0.1).requires_grad_() for n, _, r, _ in specs]
    s = [sp[3] for sp in specs]
    dys = [torch.randn(3, 5, n, device=DEVICE, generator=g) for n, *_ in specs]
    torch.manual_seed(7)
    ys = quant_lora_group(x, bases, a, b, s, dropout, backend)
    torch.autograd.backward(ys, dys)
    mask = None
    if dropout:  # the one mask all siblings share, from the same RNG state
        torch.manual_seed(7)
        if backend == "triton":
            mask = dropout_mask(15, K, dropout, int(torch.randint(0, 2**31 - 1, (1,))), DEVICE)
        else:
            _, mask = torch.native_dropout(x.detach().reshape(-1, K), dropout, True)
        mask = mask.reshape(x.shape).double()
    x64 = x.detach().double().requires_grad_()
    a64 = [t.detach().double().requires_grad_() for t in a]
    b64 = [t.detach().double().requires_grad_() for t in b]
    xd = x64 if mask is None else x64 * mask / (1 - dropout)
    want = [x64 @ p["w64"].to(DEVICE) + si * (xd @ ai.t()) @ bi.t() for p, ai, bi, si in zip(packs, a64, b64, s)]
    torch.autograd.backward(want, [d.double() for d in dys])
    pairs = [*zip(ys, want), (x.grad, x64.grad), *((t.grad, r.grad) for t, r in zip(a + b, a64 + b64))]
    for got, ref in pairs:
        assert got.shape == ref.shape and rel_err(got, ref) < 1e-5


def test_group_of_one_is_the_single_layer_function():
    from gptqlora.kernels.quant_lora import quant_lora_matmul

    p = random_packed(K, 40, 4, 32, False, False, 3, DEVICE)
    x = torch.randn(9, K, device=DEVICE)
    a, b = torch.randn(8, K, device=DEVICE), torch.randn(40, 8, device=DEVICE)
    (y,) = quant_lora_group(x, [PackedBase(p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4)], [a], [b], [2.0])
    assert torch.equal(y, quant_lora_matmul(x, a, b, p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4, 2.0))


def test_group_needs_one_of_everything_per_layer():
    p = random_packed(K, 40, 4, 32, False, False, 3, DEVICE)
    base = PackedBase(p["qweight"], p["zeros"], p["scales"], p["g_idx"], 4)
    with pytest.raises(ValueError, match="one base"):
        quant_lora_group(torch.randn(2, K), [base, base], [torch.randn(8, K)], [torch.randn(40, 8)], [1.0])
