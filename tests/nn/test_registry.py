"""The format seam: a second packed format, registered from outside, loads, trains an adapter, merges and
dequantizes through the unchanged loader, adapter dispatch and merge (the way SpQR will come in)."""

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from gptqlora.adapters import GPTQLoraConfig, GPTQLoraLinear, get_peft_model
from gptqlora.adapters.saved import SavedAdapter
from gptqlora.checkpoint import QuantConfig, load_quantized, save_quantized
from gptqlora.commands.merge import MergedSource, merge_to_fp16
from gptqlora.data.templates import PromptTemplate
from gptqlora.formats.base import FormatError, PackedFormat
from gptqlora.nn.registry import FORMATS
from gptqlora.run import Run, load_run
from tiny import char_tokenizer, tiny_llama

IDS = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class ToySpec:
    in_features: int
    out_features: int


class ToyFormat(PackedFormat):
    """int8 codes [N, K] with one fp16 scale per output channel, under names GPTQ does not use."""

    method, name, marker, stored = "toy", "toy_int8", "codes", ("codes", "scale")

    def check_bits(self, bits):
        if bits != 8:
            raise FormatError(f"toy_int8 stores 8 bit only, not {bits}")

    def spec(self, in_features, out_features, bits, group_size):
        return ToySpec(in_features, out_features)

    def shape_from_headers(self, shapes, bits):
        n, k = shapes["codes"]
        return k, n

    def read(self, tensors, spec, where=""):  # stored "codes" are the layer's "qweight"
        if tuple(tensors["codes"].shape) != (spec.out_features, spec.in_features):
            raise FormatError(f"{where}'codes' has shape {tuple(tensors['codes'].shape)}")
        return {"qweight": tensors["codes"].to(torch.int8), "scale": tensors["scale"].to(torch.float16)}

    def write(self, buffers, spec, where=""):
        return {"codes": buffers["qweight"], "scale": buffers["scale"]}


class ToyLinear(nn.Module):
    def __init__(self, spec, codes, scale, bias=None):
        super().__init__()
        self.spec, self.in_features, self.out_features = spec, spec.in_features, spec.out_features
        self.register_buffer("qweight", codes)  # the main packed tensor: PEFT places adapters by it
        self.register_buffer("scale", scale)
        self.bias = bias

    infeatures = property(lambda self: self.in_features)  # what PEFT reads to size adapters
    outfeatures = property(lambda self: self.out_features)

    @classmethod
    def from_packed(cls, spec, buffers, bias=None):
        return cls(spec, buffers["qweight"], buffers["scale"], bias)

    def packed_state(self):
        return {"qweight": self.qweight, "scale": self.scale}

    def dequantize(self, dtype=None):
        return (self.qweight.float() * self.scale.float()[:, None]).t().to(dtype or torch.float16)  # (K, N)

    def forward(self, x):
        y = x @ self.dequantize(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


@pytest.fixture
def toy_format():
    with FORMATS.registered(ToyFormat(), ToyLinear) as entry:
        yield entry
    assert "toy_int8" not in FORMATS.names()


def write_toy_checkpoint(out):
    """The tiny LLaMA with every decoder linear stored as toy_int8."""
    model = tiny_llama()
    tensors, reference = {}, {}
    for name, t in model.state_dict().items():
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and ".layers." in name and isinstance(model.get_submodule(prefix), nn.Linear):
            scale = (t.abs().amax(1) / 127).half()
            codes = torch.round(t / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            tensors[f"{prefix}.codes"], tensors[f"{prefix}.scale"] = codes, scale
            reference[prefix] = codes.float() * scale.float()[:, None]  # (N, K)
        else:
            tensors[name] = t.half()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    config = model.config.to_dict() | {"quantization_config": {"quant_method": "toy", "checkpoint_format": "toy_int8",
                                                               "bits": 8, "group_size": -1}}
    (out / "config.json").write_text(json.dumps(config))
    char_tokenizer().save_pretrained(out)
    return reference


def dense_reference(model, reference):
    ref = tiny_llama()
    for prefix, w in reference.items():
        ref.get_submodule(prefix).weight.data = w.clone()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items() if k in ref.state_dict()}, strict=False)
    return ref


def test_a_registered_format_loads_merges_and_dequantizes(toy_format, tmp_path):
    reference = write_toy_checkpoint(tmp_path / "toy")
    model = load_quantized(tmp_path / "toy", device="cpu", dtype=torch.float32)
    toys = {n: m for n, m in model.named_modules() if isinstance(m, ToyLinear)}
    assert len(toys) == 14 and model.gptq_config.method == "toy"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, dense_reference(model, reference)(IDS).logits,
                                   rtol=1e-4, atol=1e-4)

    # saved and loaded again through the same seam
    save_quantized(model, tmp_path / "toy2")
    again = load_quantized(tmp_path / "toy2", device="cpu", dtype=torch.float32)
    assert all(torch.equal(again.get_submodule(n).qweight, m.qweight) for n, m in toys.items())

    # an adapter on it (PEFT dispatch asks the registry), in a run folder
    pm = get_peft_model(model, GPTQLoraConfig(lora_dropout=0.0))
    assert isinstance(pm.base_model.model.model.layers[0].mlp.up_proj, GPTQLoraLinear)
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    run = Run.create(tmp_path / "run")
    run.record(tmp_path / "toy", [], [], PromptTemplate.load("alpaca"))
    run.save_adapter(pm)
    run.save_tokenizer(char_tokenizer())

    # merge dequantizes each toy layer and adds the update
    src = MergedSource(run.base_dir(), SavedAdapter(run.adapter()))
    prefix = "model.layers.1.self_attn.o_proj"
    torch.testing.assert_close(src.layer(prefix).dequantize(torch.float32).t(), reference[prefix])
    out = merge_to_fp16(run.root, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, load_run(run.root, device="cpu", dtype=torch.float32)(IDS).logits,
                                   rtol=1e-4, atol=1e-4)


def test_registry_lookup_errors(toy_format):
    assert FORMATS.lookup("toy", None).format.name == "toy_int8" and FORMATS.lookup("gptq").format.name == "gptq"
    with pytest.raises(FormatError, match="quant_method 'awq' is not one gptqlora reads"):
        FORMATS.lookup("awq")
    with pytest.raises(FormatError, match="belongs to quant_method 'gptq'"):
        FORMATS.lookup("toy", "gptq_v2")
    with pytest.raises(ValueError, match="already registered"):
        FORMATS.register(ToyFormat(), ToyLinear)
    with pytest.raises(Exception, match="toy_int8 stores 8 bit only"):
        QuantConfig(bits=4, format="toy_int8")
