"""Decoding through the small-M kernel: greedy generations equal the torch reference path's, with the static
KV cache that `--decode compiled` uses (on CPU transformers does not compile; the cache path still runs),
and the layer dispatch picks the kernel only where it applies."""

import pytest
import torch

from gptqlora import inference
from gptqlora.adapters import GPTQLoraConfig, GPTQLoraLinear, get_peft_model
from gptqlora.inference import InferenceError, Sampling, generate_responses
from gptqlora.kernels import dispatch, gemv
from gptqlora.nn.quant_linear import QuantLinear
from tiny import char_tokenizer, packed_tiny_llama


@pytest.fixture(scope="module")
def model():
    m = packed_tiny_llama(bits=3, group_size=32, layers=1, hidden=64, intermediate=128, seed=2)
    for mod in m.modules():  # act-order group maps: the kernel reads the repacked copy
        if isinstance(mod, QuantLinear):
            mod.g_idx.copy_(mod.g_idx[torch.randperm(mod.in_features, generator=torch.Generator().manual_seed(0))])
    pm = get_peft_model(m, GPTQLoraConfig(r=8, lora_dropout=0.0)).eval()
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return pm


def count_kernel_calls(monkeypatch) -> list:
    calls = []
    real = gemv.gemv_triton
    monkeypatch.setattr(gemv, "gemv_triton", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    return calls


@pytest.mark.parametrize("static_cache", [False, True])
def test_greedy_generations_of_the_kernel_path_equal_the_reference_path(model, monkeypatch, static_cache):
    tok = char_tokenizer()
    prompts = [tok("abc")["input_ids"], tok("hello there, general")["input_ids"]]  # batched, left-padded
    sampling = Sampling(max_new_tokens=5, decode="compiled" if static_cache else "eager")
    monkeypatch.setattr(inference, "compiled_decode", lambda model, s: s.decode == "compiled")  # no CUDA here
    monkeypatch.setenv(dispatch.ENV, "torch")
    want = generate_responses(model, tok, prompts, sampling)
    monkeypatch.setenv(dispatch.ENV, "triton")
    calls = count_kernel_calls(monkeypatch)
    got = generate_responses(model, tok, prompts, sampling)
    assert got == want and any(w for w in want)
    # 4 decode steps x 4 launches (q|k|v and gate|up one each: their act-order maps are equal), batch 2
    assert len(calls) == 4 * 4 and all(c[0] == 2 for c in calls)


def test_siblings_with_different_row_orders_decode_one_by_one(monkeypatch):
    """q/k/v with different act-order maps cannot share a launch: seven calls per step, same tokens."""
    m = packed_tiny_llama(bits=4, group_size=32, layers=1, hidden=64, intermediate=128, seed=3)
    for i, mod in enumerate(x for x in m.modules() if isinstance(x, QuantLinear)):
        mod.g_idx.copy_(mod.g_idx[torch.randperm(mod.in_features, generator=torch.Generator().manual_seed(i))])
    pm = get_peft_model(m, GPTQLoraConfig(r=8, lora_dropout=0.0)).eval()
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    tok = char_tokenizer()
    sampling = Sampling(max_new_tokens=4, decode="eager")
    monkeypatch.setenv(dispatch.ENV, "torch")
    want = generate_responses(pm, tok, [tok("abc")["input_ids"]], sampling)
    monkeypatch.setenv(dispatch.ENV, "triton")
    calls = count_kernel_calls(monkeypatch)
    assert generate_responses(pm, tok, [tok("abc")["input_ids"]], sampling) == want
    assert len(calls) == 4 * 7  # the 3-token prefill and 3 decode steps, each layer alone


def test_kernel_only_without_gradient_and_at_small_m(model, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "triton")
    calls = count_kernel_calls(monkeypatch)
    layer = next(m for m in model.modules() if isinstance(m, GPTQLoraLinear))
    x = torch.randn(1, 3, layer.in_features)
    with torch.no_grad():
        layer(x)
        layer(torch.randn(2, 9, layer.in_features))  # 18 rows: the training kernels
    assert len(calls) == 1
    layer(x.requires_grad_())  # a gradient is wanted: the autograd path
    with torch.no_grad(), model.disable_adapter():
        layer(torch.randn(4, layer.in_features))  # base alone: the kernel without LoRA
    assert len(calls) == 2
    monkeypatch.setenv(dispatch.ENV, "torch")
    with torch.no_grad():
        layer(x)
    assert len(calls) == 2


def test_compiled_decode_needs_cuda(model):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert not inference.compiled_decode(model, Sampling(decode="auto"))
    with pytest.raises(InferenceError, match="--decode compiled needs a CUDA device"):
        inference.compiled_decode(model, Sampling(decode="compiled"))
    with pytest.raises(InferenceError, match="--decode must be one of"):
        Sampling(decode="fast")


def test_act_order_siblings_read_slices_of_their_shared_copy(model, monkeypatch):
    """After the group plan, each act-order sibling's own decode copy is a view into the group's (no second
    copy), and a sibling called alone through it still computes its own layer."""
    from gptqlora.nn.sibling_gemv import group_plan

    monkeypatch.setenv(dispatch.ENV, "triton")
    layer = next(m for m in model.modules() if isinstance(m, GPTQLoraLinear) and m.siblings is not None)
    bases = [m.base_layer for m in layer.siblings.layers]
    assert group_plan(bases) is not None
    group = bases[0].group_qweight
    x = torch.randn(2, bases[0].in_features)
    for b in bases:
        assert b.gemv_qweight.untyped_storage().data_ptr() == group.untyped_storage().data_ptr()
        assert b.gemv_qweight.stride(0) == group.shape[1] and b.gemv_qweight.shape[1] == b.out_features
        with torch.no_grad():
            got = b.small_m(x)
        monkeypatch.setenv(dispatch.ENV, "torch")
        with torch.no_grad():
            want = b(x)
        monkeypatch.setenv(dispatch.ENV, "triton")
        assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("bits", [4, 3])
def test_tensor_core_plans_decode_through_the_dense_fallback_off_cuda(bits, monkeypatch):
    """GPTQLORA_GEMV_MMA=1 (kernels/gemv_mma.py): the layers and sibling groups plan fragment-ordered copies (the
    group's tiles side by side, each sibling's a slice, one split-K counter per 16 output columns; 3-bit codes
    and zeros in 4-bit slots), and off CUDA their calls take the dense fallback, which reads the codes back from
    the copy as the kernel would: greedy generations equal the reference path's."""
    from gptqlora.formats.gptq import unpack_cols
    from gptqlora.kernels import gemv_mma
    from gptqlora.nn.sibling_gemv import group_plan

    m = packed_tiny_llama(bits=bits, group_size=32, layers=1, hidden=64, intermediate=128, seed=3)
    pm = get_peft_model(m, GPTQLoraConfig(r=8, lora_dropout=0.0)).eval()
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    tok = char_tokenizer()
    prompts = [tok("abc")["input_ids"], tok("hello there")["input_ids"]]
    sampling = Sampling(max_new_tokens=4, decode="eager")
    monkeypatch.setenv(dispatch.ENV, "torch")
    want = generate_responses(pm, tok, prompts, sampling)
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setenv(gemv_mma.ENV, "1")
    got = generate_responses(pm, tok, prompts, sampling)
    assert got == want and any(w for w in want)
    layer = next(m for m in pm.modules() if isinstance(m, GPTQLoraLinear) and m.siblings is not None)
    bases = [m.base_layer for m in layer.siblings.layers]
    assert group_plan(bases) is not None
    group = bases[0].group_qweight
    assert group.dim() == 4 and group.shape[0] * 16 == sum(b.out_features for b in bases)
    assert bases[0].group_locks.numel() == group.shape[0] + gemv_mma.U_LOCKS  # and lora_u's, past the kernel's
    for b in bases:
        assert b.gemv_qweight.dim() == 4 and b.gemv_qweight.shape[0] * 16 == b.out_features
        assert b.gemv_qweight.untyped_storage().data_ptr() == group.untyped_storage().data_ptr()
        if bits == 3:  # the zeros the copy is read with: the same values, 4 bits each
            assert torch.equal(unpack_cols(b.gemv_zeros, 4, b.out_features), unpack_cols(b.qzeros, 3, b.out_features))
        else:
            assert b.gemv_zeros is None and b.decode_zeros is b.qzeros
    if bits == 3:  # the group's zeros side by side, 8 to an int32 word
        assert bases[0].group_zeros.shape[1] * 8 == sum(b.out_features for b in bases)


def test_batch_picks_the_decode_kernel_and_only_grows(monkeypatch):
    """GPTQLORA_GEMV_MMA unset: prepare_decode's batch picks the GPTQ layers' kernel (gemv_mma.wanted): one row
    plans the Triton kernels' copy, two or more the tensor-core kernel's (4-D), and a later batch of one keeps
    it (no switching back and forth). A switch drops the model's cached decoders (their graphs read the old
    plans); =0 / =1 pin the kernel; an fp32 model never switches (every call would take the dense fallback)."""
    from gptqlora.graph_decode import DECODERS
    from gptqlora.kernels import gemv_mma
    from gptqlora.nn.sibling_gemv import group_plan

    monkeypatch.delenv(gemv_mma.ENV, raising=False)
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert [gemv_mma.wanted(b) for b in (None, 1, 2, 16)] == [False, False, True, True]
    m = packed_tiny_llama(bits=4, group_size=32, layers=1, hidden=64, intermediate=128, seed=4)
    pm = get_peft_model(m.to(torch.bfloat16), GPTQLoraConfig(r=8, lora_dropout=0.0)).eval()
    bases = [mod for mod in pm.modules() if type(mod) is QuantLinear]
    group = [b.base_layer for b in next(mod for mod in pm.modules()
                                        if isinstance(mod, GPTQLoraLinear) and mod.siblings is not None).siblings.layers]

    def planned() -> set:  # per layer: "mma" (fragment-ordered copy) or "triton"
        return {"mma" if b.gemv_qweight is not None and b.gemv_qweight.dim() == 4 else "triton" for b in bases}

    inference.prepare_decode(pm, 1)
    assert planned() == {"triton"} and group_plan(group) is not None and group[0].group_qweight.dim() == 2
    pm.__dict__[DECODERS] = {"cached": object()}  # stands for graph_decode's decoders
    inference.prepare_decode(pm, 3)
    assert planned() == {"mma"} and group[0].group_qweight.dim() == 4
    assert DECODERS not in pm.__dict__
    pm.__dict__[DECODERS] = {"cached": object()}
    inference.prepare_decode(pm, 1)
    assert planned() == {"mma"} and DECODERS in pm.__dict__  # grown: batch 1 keeps it
    monkeypatch.setenv(gemv_mma.ENV, "0")
    inference.prepare_decode(pm, 3)
    assert planned() == {"triton"} and group[0].group_qweight.dim() == 2
    monkeypatch.delenv(gemv_mma.ENV)
    m32 = get_peft_model(packed_tiny_llama(bits=4, group_size=32, layers=1, hidden=64, intermediate=128, seed=4),
                         GPTQLoraConfig(r=8, lora_dropout=0.0)).eval()
    inference.prepare_decode(m32, 3)
    assert all(b.decode_batch is None and (b.gemv_qweight is None or b.gemv_qweight.dim() == 2)
               for b in m32.modules() if type(b) is QuantLinear)
