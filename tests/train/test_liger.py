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


@pytest.mark.parametrize("blocks", [True, False])
def test_compiled_blocks_take_only_the_fused_loss(monkeypatch, blocks):
    """With compiled blocks Liger brings its fused linear + cross-entropy and nothing inside the blocks
    (inductor fuses those ops, and Liger's inside a compiled block measured slower)."""
    import sys
    import types

    import gptqlora.train.liger as liger

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model, **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(liger, "_why_not", lambda model: None)
    assert apply_liger(tiny_llama(), "on", blocks=blocks) is True
    assert calls == [dict(rope=blocks, rms_norm=blocks, swiglu=blocks, fused_linear_cross_entropy=True)]
