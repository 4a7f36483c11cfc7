"""Interop with GPTQModel, both ways (optional dependency; CI runs this in its own venv).

GPTQModel's CPU kernels compute in fp16, ours here in fp32 on the same dequantized weights, so logits agree
to fp16 rounding (~3e-3 on logits of magnitude ~2); a wrong bit layout or zero convention is off by ~1.
"""

import logging
import importlib.util
import os
import warnings

if importlib.util.find_spec("gptqmodel"):  # its venv only: set at import, this would turn torch.compile
    # off for every later test of the main suite (which collects this file and skips it)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # GPTQModel's TorchLinear would torch.compile (30 s)

import pytest  # noqa: E402
import torch  # noqa: E402

gptqmodel = pytest.importorskip("gptqmodel")

from gptqlora.adapters import GPTQLoraConfig, get_peft_model  # noqa: E402
from gptqlora.checkpoint.checkpoint import load_quantized  # noqa: E402
from gptqlora.checkpoint.config import QuantConfig  # noqa: E402
from gptqlora.quant.driver import quantize_model  # noqa: E402
from tiny import calibration_samples  # noqa: E402

pytestmark = pytest.mark.interop
TOL = 1e-2
CASES = [(b, d) for b in (2, 3, 4, 8) for d in (False, True)]
IDS = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # GPTQModel.quantize writes ./logs/*.log into the working directory


def gptqmodel_quantize(src, out, bits, desc_act):
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=bits, group_size=32, sym=True, desc_act=desc_act,
                          act_group_aware=False if desc_act else None, pack_impl="original")
    m = GPTQModel.load(str(src), qcfg, device="cpu", dtype=torch.float16)
    calib = [{"input_ids": s[0].tolist(), "attention_mask": [1] * s.shape[1]} for s in calibration_samples(16)]
    m.quantize(calib, batch_size=1)
    m.save(str(out))
    return out


def gptqmodel_logits(path):
    from gptqmodel import BACKEND, GPTQModel

    gm = GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    with torch.no_grad():
        return gm.model, gm(input_ids=IDS).logits.float()


def our_logits(path):
    with torch.no_grad():
        return load_quantized(path, device="cpu", dtype=torch.float32)(IDS).logits


@pytest.mark.parametrize("bits,desc_act", CASES)
def test_gptqmodel_checkpoint_loads_in_gptqlora(tiny_dir, tmp_path, bits, desc_act):
    out = gptqmodel_quantize(tiny_dir, tmp_path / "gm", bits, desc_act)
    _, theirs = gptqmodel_logits(out)
    assert (our_logits(out) - theirs).abs().max() < TOL


@pytest.mark.parametrize("bits,desc_act", CASES)
def test_gptqlora_checkpoint_loads_in_gptqmodel_and_transformers(tiny_dir, tmp_path, bits, desc_act):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ours"
    quantize_model(tiny_dir, out, QuantConfig(bits=bits, group_size=32, desc_act=desc_act),
                   calibration_samples(), device="cpu", progress=False)
    ours = our_logits(out)
    _, theirs = gptqmodel_logits(out)
    assert (ours - theirs).abs().max() < TOL
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16)
    with torch.no_grad():
        assert (ours - hf(IDS).logits.float()).abs().max() < TOL


def test_gptqlora_adapter_loads_with_plain_peft_on_gptqmodel_base(tiny_dir, tmp_path):
    from peft import PeftModel

    out = tmp_path / "q"
    quantize_model(tiny_dir, out, QuantConfig(bits=4, group_size=32), calibration_samples(), device="cpu",
                   progress=False)
    pm = get_peft_model(load_quantized(out, device="cpu", dtype=torch.float32), GPTQLoraConfig(lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 would make the check vacuous
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ours = pm.eval()(IDS).logits
    base, _ = gptqmodel_logits(out)
    with warnings.catch_warnings(record=True) as caught, _LogRecords() as logged:
        warnings.simplefilter("always")
        theirs_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    # a standard PEFT adapter: no "Unexpected keyword arguments" (our own settings live beside it)
    assert _ours(caught) == [] and logged.warnings == []
    with torch.no_grad():
        theirs = theirs_model(input_ids=IDS).logits.float()
    assert (ours - theirs).abs().max() < 2 * TOL


def _ours(caught) -> list[str]:
    """Warnings caught, less transformers 5's deprecation of `is_gradient_checkpointing`, which PEFT's own
    code triggers for any adapter (the CLI filters it too)."""
    return [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)]


class _LogRecords(logging.Handler):
    """Warnings and errors logged by any library while in the `with` block."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings.append(f"{record.name}: {record.getMessage()}")

    def __enter__(self) -> "_LogRecords":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)


def test_run_adapter_loads_with_plain_peft_on_gptqmodel_base(tiny_dir, tmp_path):
    """A run's adapter/ (what finetune writes), loaded as a user of plain PEFT would."""
    import json

    from peft import LoraConfig, PeftModel

    from runs import make_run

    run = make_run(tiny_dir, tmp_path / "run")
    raw = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(raw) <= set(LoraConfig.__dataclass_fields__) | {"peft_type", "auto_mapping", "peft_version"}
    assert raw["base_model_name_or_path"] == "../base"  # relative to the adapter folder: moves with the run
    base, _ = gptqmodel_logits(run / "base")
    with warnings.catch_warnings(record=True) as caught, _LogRecords() as logged:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, str(run / "adapter"))
    assert _ours(caught) == [] and logged.warnings == []


def test_requantized_merge_loads_in_gptqmodel(tiny_dir, tmp_path):
    from gptqlora.commands.merge import merge_to_gptq
    from gptqlora.quant.api import QuantizeOptions
    from runs import make_run

    run = make_run(tiny_dir, tmp_path / "run")
    merge_to_gptq(run, tmp_path / "merged", QuantConfig(bits=4, group_size=32), QuantizeOptions(nsamples=4, seqlen=32),
                  device="cpu")
    _, theirs = gptqmodel_logits(tmp_path / "merged")
    assert (our_logits(tmp_path / "merged") - theirs).abs().max() < TOL


def test_precision_rules_mean_the_same_in_gptqmodel():
    from gptqmodel.quantization.config import dynamic_get

    from gptqlora.quant.precision import build_rules

    rules = build_rules(["crucial", r"model\.layers\.0\..*"], [r".*\.1\.self_attn\.q_proj=bits:8,group_size:64",
                                                               ".*gate_proj=bits:4,sym:false"],
                        errors={"model.layers.0.self_attn.v_proj": 2.0, "model.layers.0.self_attn.o_proj": 1.0,
                                "model.layers.0.self_attn.q_proj": 0.5})
    cfg = QuantConfig(bits=2, group_size=32, dynamic=rules)
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]
    for n in names:
        theirs = dynamic_get(rules, n)
        ours = cfg.for_module(n)
        if theirs is False:
            assert ours is None, n
        else:
            assert ours == {"bits": 2, "group_size": 32, "desc_act": False, "sym": True, **(theirs or {})}, n


def test_mixed_precision_checkpoint_loads_in_gptqmodel(tiny_dir, tmp_path):
    out = tmp_path / "mixed"
    rules = {r"-:.*\.mlp\.(gate_proj|up_proj|down_proj)$": {}, r"+:.*\.0\.self_attn\.q_proj$": {"bits": 8}}
    quantize_model(tiny_dir, out, QuantConfig(bits=4, group_size=32, dynamic=rules), calibration_samples(),
                   device="cpu", progress=False)
    model, theirs = gptqmodel_logits(out)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert (our_logits(out) - theirs).abs().max() < TOL
