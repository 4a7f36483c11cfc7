"""Perplexity, GPTQ protocol: non-overlapping windows, the tail dropped, exp of the mean token loss."""

import math

import pytest
import torch

from gptqlora.eval.perplexity import PerplexityError, perplexity, response_perplexity
from tiny import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=1, hidden=64, intermediate=128)


def test_windows_and_value_match_a_direct_computation(model):
    ids = torch.randint(4, 128, (1000,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, seqlen=128, batch_size=3)
    assert r["windows"] == 7 and r["tokens"] == 7 * 128 and r["seqlen"] == 128  # the 104-token tail is dropped
    with torch.no_grad():
        losses = [float(model(input_ids=ids[s:s + 128][None], labels=ids[s:s + 128][None]).loss)
                  for s in range(0, 7 * 128, 128)]
    assert r["perplexity"] == pytest.approx(math.exp(sum(losses) / 7), rel=1e-5)
    assert perplexity(model, ids, 128, max_windows=2)["windows"] == 2


@pytest.mark.parametrize("n,seqlen,match", [(50, 128, "fewer than one window"), (5000, 4096, "longer than the model"),
                                            (500, 1, "at least 2")])
def test_bad_settings_say_what_to_change(model, n, seqlen, match):
    with pytest.raises(PerplexityError, match=match):
        perplexity(model, torch.zeros(n, dtype=torch.long), seqlen)


def test_response_perplexity_scores_only_labelled_tokens(model):
    ids = list(range(4, 40))
    masked = {"input_ids": ids, "labels": [-100] * 30 + ids[30:]}
    r = response_perplexity(model, [masked, {"input_ids": ids[:20], "labels": [-100] * 15 + ids[15:20]}])
    assert r["tokens"] == 6 + 5 and r["records"] == 2  # each labelled token is predicted from the one before
    with pytest.raises(PerplexityError):
        response_perplexity(model, [{"input_ids": ids, "labels": [-100] * len(ids)}])
