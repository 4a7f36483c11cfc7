"""graph_decode's loop, run eagerly on the CPU (the CUDA graph and compile are GPU-checked by
bench/gpu_check_decode.py): the same tokens as transformers' generate, ends, streaming, reuse, sampling."""

import pytest
import torch

from gptqlora.graph_decode import adapter_state, decoder_for, pick_next
from tiny import tiny_llama

PAD, EOS = 0, 2


def prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 128, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def hf_greedy(model, ids, mask, new, eos):
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=PAD, eos_token_id=eos, disable_compile=True)
    return gen[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, hidden=64, intermediate=128, seed=1)


def test_greedy_tokens_equal_transformers_generate_with_padding_and_an_early_end(model):
    ids, mask = prompts()
    free = hf_greedy(model, ids, mask, 12, None)
    eos = int(free[0, 4])  # row 0 ends at its fifth token; the others go on (or end where they meet it)
    want = hf_greedy(model, ids, mask, 12, eos)
    got = decoder_for(model, 3, 64).run(ids, mask, 12, [eos], PAD, sample=False)
    assert torch.equal(got[:, :want.shape[1]], want)
    assert (got[0, 5:] == PAD).all()  # after its end a row only pads


def test_a_reused_decoder_forgets_the_last_call(model):
    ids, mask = prompts()
    dec = decoder_for(model, 3, 64)
    assert decoder_for(model, 3, 64) is dec
    first = dec.run(ids, mask, 6, [EOS], PAD, sample=False)
    other = torch.randint(4, 128, (3, 20), generator=torch.Generator().manual_seed(9))
    dec.run(other, torch.ones_like(other), 10, [EOS], PAD, sample=False)
    assert torch.equal(dec.run(ids, mask, 6, [EOS], PAD, sample=False), first)
    assert torch.equal(first, hf_greedy(model, ids, mask, 6, EOS))


def test_streaming_sees_every_token_and_can_stop(model):
    ids, mask = prompts()
    seen = []
    got = decoder_for(model, 3, 64).run(ids, mask, 10, [EOS], PAD, sample=False,
                                        on_token=lambda t: seen.append(t.clone()) or len(seen) == 3)
    assert got.shape[1] == 3 and torch.equal(torch.stack(seen, 1), got)
    with pytest.raises(ValueError, match="decoder for batch 3, 64 tokens"):
        decoder_for(model, 3, 64).run(ids, mask, 60, [EOS], PAD, sample=False)


def test_sampling_draws_in_proportion_within_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(20000, 4)
    torch.manual_seed(0)
    counts = torch.bincount(pick_next(logits, True, torch.tensor(1.0), torch.tensor(1.0)), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    nucleus = torch.bincount(pick_next(logits, True, torch.tensor(1.0), torch.tensor(0.75)), minlength=4) / 20000
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0, 0]), atol=0.015, rtol=0)  # 0.5 + 0.3 >= .75
    assert torch.equal(pick_next(logits[:2], False, torch.tensor(1.0), torch.tensor(1.0)), torch.tensor([0, 0]))
    cold = pick_next(logits[:50], True, torch.tensor(1e-3), torch.tensor(1.0))  # temperature -> 0: greedy
    assert (cold == 0).all()


def test_adapter_state_tells_adapters_apart():
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(tiny_llama(layers=1, hidden=64, intermediate=128), LoraConfig(r=4, target_modules=["q_proj"]))
    on = adapter_state(pm)
    with pm.disable_adapter():
        off = adapter_state(pm)
    assert on == (("default",), False, False) and off != on and adapter_state(tiny_llama(layers=1)) == ()


def test_a_cache_without_tensor_counters_is_one_clear_error(model, monkeypatch):
    """Another transformers version's StaticCache: `chat`/`generate` say to use --decode eager."""
    from gptqlora import graph_decode, inference
    from tiny import char_tokenizer

    monkeypatch.setattr(graph_decode, "_cache_lengths", lambda cache: (_ for _ in ()).throw(
        graph_decode.DecodeUnsupported("no counters; use --decode eager")))
    monkeypatch.setattr(inference, "compiled_decode", lambda model, sampling: True)
    ids, mask = prompts()
    with pytest.raises(inference.InferenceError, match="use --decode eager"):
        inference.generate_ids(model, char_tokenizer(), ids[:1], mask[:1], inference.Sampling(max_new_tokens=3))
