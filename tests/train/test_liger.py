"""--liger: applied only where it can run, with one clear error where it was demanded and cannot."""

import pytest

from gptqlora.train.liger import apply_liger
from tiny import tiny_llama


def test_auto_skips_a_cpu_model_and_on_refuses_it():
    model = tiny_llama()
    assert apply_liger(model, "auto") is False
    assert apply_liger(model, "off") is False
    with pytest.raises(RuntimeError, match="--liger on: the model is on cpu"):
        apply_liger(model, "on")
    with pytest.raises(ValueError, match="liger mode"):
        apply_liger(model, "sometimes")
