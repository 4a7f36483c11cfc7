"""The chunked loss equals transformers' loss and gradients, and never builds the whole batch's logits."""

import torch

from gptqlora.train.loss import apply_chunked_loss
from tiny import packed_tiny_llama


def _loss_and_grads(model, ids, labels, **kw):
    import gptqlora
    from gptqlora.adapters import GPTQLoraConfig

    pm = gptqlora.get_peft_model(model, GPTQLoraConfig(r=4, lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.05)
    out = pm(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_chunked_loss_matches_the_full_loss_and_its_gradients():
    ids = torch.randint(4, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :25] = -100  # prompt tokens, not learned
    labels[2, 30:] = -100  # padding
    for num_items in (None, torch.tensor(77)):
        kw = {} if num_items is None else {"num_items_in_batch": num_items}
        ref, ref_g = _loss_and_grads(packed_tiny_llama(bits=2, group_size=32), ids, labels, **kw)
        chunked_model = packed_tiny_llama(bits=2, group_size=32)
        apply_chunked_loss(chunked_model, chunk=16)  # 120 tokens: 8 chunks, the last one short
        rows = []
        chunked_model.lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
        got, got_g = _loss_and_grads(chunked_model, ids, labels, **kw)
        assert max(rows) == 16 and sum(rows) >= 120  # forward + recompute, one chunk of logits at a time
        assert got.logits is None and ref.logits.shape == (3, 40, 128)
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
        assert got_g.keys() == ref_g.keys() and len(got_g) > 0
        for n in ref_g:
            torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6)


def test_chunked_model_still_returns_logits_without_labels_or_grad():
    model = packed_tiny_llama(bits=4, group_size=32)
    apply_chunked_loss(model)
    ids = torch.randint(4, 128, (1, 12))
    assert model(input_ids=ids).logits.shape == (1, 12, 128)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)  # evaluation: the model's own forward
    assert out.logits is not None and torch.isfinite(out.loss)
