"""Quantize a tiny model, save, load; sharding; bad input gives one clear error and leaves nothing behind."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptqlora.formats.gptq import pack_cols, unpack_cols
from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.checkpoint.checkpoint import load_quantized, save_quantized
from gptqlora.checkpoint.config import QuantConfig, QuantConfigError
from gptqlora.checkpoint.io import CheckpointError
from gptqlora.data.calibration import CalibrationError
from gptqlora.quant.driver import quantize_model
from tiny import calibration_samples, tiny_llama


def quantize(src: Path, out: Path, **kw) -> Path:
    qcfg = QuantConfig(**{"bits": 4, "group_size": 32, **kw})
    quantize_model(src, out, qcfg, calibration_samples(), device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def q4(tiny_dir, tmp_path_factory):
    return quantize(tiny_dir, tmp_path_factory.mktemp("q") / "q4", desc_act=True)


def dequantized_reference(qmodel):
    """The fp32 model whose linears hold exactly the dequantized weights."""
    ref = tiny_llama()
    for name, mod in qmodel.named_modules():
        if isinstance(mod, QuantLinear):
            ref.get_submodule(name).weight.data = mod.dequantize(torch.float32).t().contiguous()
    ref.load_state_dict({k: v.float() for k, v in qmodel.state_dict().items() if k in ref.state_dict()},
                        strict=False)
    return ref


def test_layout_config_and_report(q4):
    files = {p.name for p in q4.iterdir()}
    assert {"config.json", "quantize_config.json", "quant_report.json", "model.safetensors",
            "tokenizer.json"} <= files
    qc = json.loads((q4 / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["desc_act"] and qc["checkpoint_format"] == "gptq"
    t = load_file(q4 / "model.safetensors")
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (256 * 4 // 32, 128)
    assert t["model.layers.0.mlp.down_proj.qzeros"].dtype == torch.int32
    assert t["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert (t["model.layers.0.self_attn.q_proj.qzeros"] == 0x77777777).all()  # sym v1
    report = json.loads((q4 / "quant_report.json").read_text())
    assert len(report["modules"]) == 14 and len(report["blocks"]) == 2


def test_load_gives_dequantized_logits(q4):
    qm = load_quantized(q4, device="cpu", dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in qm.modules()) == 14
    ids = torch.randint(4, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(qm(ids).logits, dequantized_reference(qm)(ids).logits, rtol=1e-4, atol=1e-4)


def test_quantized_model_is_close_to_fp_at_8_bit(tiny_dir, tmp_path):
    out = quantize(tiny_dir, tmp_path / "q8", bits=8)
    ids = torch.randint(4, 128, (1, 16))
    with torch.no_grad():
        a = tiny_llama()(ids).logits
        b = load_quantized(out, device="cpu", dtype=torch.float32)(ids).logits
    assert float((a - b).norm() / a.norm()) < 0.02


def test_save_round_trip_and_sharding(q4, tmp_path):
    qm = load_quantized(q4, device="cpu")
    out = save_quantized(qm, tmp_path / "resaved", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    orig = load_file(q4 / "model.safetensors")
    again = {}
    for f in out.glob("model-*.safetensors"):
        again.update(load_file(f))
    assert orig.keys() == again.keys()
    assert all(torch.equal(orig[k], again[k]) for k in orig)


def test_asym_default_v2_and_v1_keeps_zeros_storable(tiny_dir, tmp_path):
    v2 = quantize(tiny_dir, tmp_path / "v2", sym=False, format="gptq_v2", bits=2)
    v1 = quantize(tiny_dir, tmp_path / "v1", sym=False, format="gptq", bits=2)
    ids = torch.randint(4, 128, (1, 8))
    for d in (v2, v1):
        qm = load_quantized(d, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(qm(ids).logits, dequantized_reference(qm)(ids).logits, rtol=1e-4, atol=1e-4)
    qm = load_quantized(v2, device="cpu")
    layer = qm.model.layers[0].self_attn.q_proj
    z = unpack_cols(layer.qzeros, 2)
    z[0, 0] = 0  # a true zero of 0: fine in v2, impossible in v1
    layer.qzeros = pack_cols(z, 2)
    with pytest.raises(ValueError, match=r"q_proj: 1 zero point.*gptq_v2"):
        save_quantized(qm, tmp_path / "bad", QuantConfig(bits=2, group_size=32, sym=False, format="gptq"))
    assert not (tmp_path / "bad").exists()


def test_tied_embeddings(tmp_path):
    from tiny import save_tiny_llama

    src = save_tiny_llama(tmp_path / "tied", tie=True)
    qm = load_quantized(quantize(src, tmp_path / "q"), device="cpu")
    assert qm.lm_head.weight.data_ptr() == qm.model.embed_tokens.weight.data_ptr()


# --- bad input ---------------------------------------------------------------------------------------

def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors(q4, tmp_path):
    d = copy_dir(q4, tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_quantized(d, device="cpu")


def test_corrupt_header(q4, tmp_path):
    d = copy_dir(q4, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(d, device="cpu")


def test_config_disagrees_with_shapes(q4, tmp_path):
    d = copy_dir(q4, tmp_path / "mismatch")
    qc = json.loads((d / "quantize_config.json").read_text())
    qc["bits"] = 2
    (d / "quantize_config.json").write_text(json.dumps(qc))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.layers\.0\..*'qweight' has shape"):
        load_quantized(d, device="cpu")


def test_unsupported_bits(q4, tmp_path):
    d = copy_dir(q4, tmp_path / "bits5")
    qc = json.loads((d / "quantize_config.json").read_text())
    qc["bits"] = 5
    (d / "quantize_config.json").write_text(json.dumps(qc))
    with pytest.raises(QuantConfigError, match=r"quantize_config\.json: unsupported bits=5"):
        load_quantized(d, device="cpu")


def test_missing_tensor_and_pickles_refused(q4, tmp_path):
    d = copy_dir(q4, tmp_path / "missing")
    t = load_file(d / "model.safetensors")
    del t["model.norm.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks weights"):
        load_quantized(d, device="cpu")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_quantized(d, device="cpu")


def test_not_quantized(tiny_dir):
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        load_quantized(tiny_dir, device="cpu")


def test_failed_quantize_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import gptqlora.quant.driver as driver

    def boom(*a, **k):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(driver, "_relative_error", boom)
    with pytest.raises(RuntimeError):
        quantize(tiny_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_refused(tiny_dir, q4):
    with pytest.raises(FileExistsError, match="--overwrite"):
        quantize(tiny_dir, q4)


def test_calibration_errors(tmp_path):
    from tiny import char_tokenizer

    from gptqlora.data.calibration import load_calibration

    tok = char_tokenizer()
    cases = {"empty.txt": "", "blank.jsonl": '{"text": "  "}\n', "nofield.jsonl": '{"x": 1}\n',
             "broken.jsonl": '{"text": "a"}\n{"text": \n'}
    for name, body in cases.items():
        (tmp_path / name).write_text(body)
    with pytest.raises(CalibrationError, match=r"empty\.txt: no usable calibration text"):
        load_calibration(tmp_path / "empty.txt", tok)
    with pytest.raises(CalibrationError, match=r"blank\.jsonl: no usable"):
        load_calibration(tmp_path / "blank.jsonl", tok)
    with pytest.raises(CalibrationError, match=r"nofield\.jsonl:1: cannot tell the record kind"):
        load_calibration(tmp_path / "nofield.jsonl", tok)
    with pytest.raises(CalibrationError, match=r"broken\.jsonl:2: invalid JSON \(Expecting value, column 10\)"):
        load_calibration(tmp_path / "broken.jsonl", tok)
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [5, 6, 7]}\n{"text": "hello world, hello"}\n')
    s = load_calibration(tmp_path / "ids.jsonl", tok, nsamples=4, seqlen=8)
    assert s[0].tolist() == [[5, 6, 7]] and all(x.shape[1] <= 8 for x in s)


def test_calibration_reads_instruction_records_and_says_when_windows_overlap(tmp_path, caplog):
    """finetune's Alpaca records calibrate quantize too (rendered with the template, as training renders them;
    tests/data/test_calibration.py); a corpus too short for disjoint windows is still used, with a warning
    naming the overlap."""
    from tiny import char_tokenizer

    from gptqlora.data.calibration import load_calibration, read_calibration_records
    from gptqlora.data.templates import PromptTemplate

    f = tmp_path / "alpaca.jsonl"
    f.write_text('{"instruction": "Add 2 and 3.", "input": "", "output": "5"}\n{"instruction": "Say hi.", "output": "hi"}\n')
    short = PromptTemplate.load("alpaca_short")
    assert read_calibration_records(f, short) == (["### Instruction:\nAdd 2 and 3.\n\n### Response:\n5",
                                                   "### Instruction:\nSay hi.\n\n### Response:\nhi"], [])
    tok = char_tokenizer()
    with caplog.at_level("WARNING", logger="gptqlora.data.calibration"):
        s = load_calibration(f, tok, nsamples=5, seqlen=32, template=short)  # 89 tokens: 2 disjoint windows
    assert len(s) == 5 and "the windows overlap" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gptqlora.data.calibration"):
        load_calibration(f, tok, nsamples=2, seqlen=32, template=short)  # room for 2 disjoint windows of 32
    assert "overlap" not in caplog.text


def test_meta_records_gptaq_as_gptqmodel_reads_it():
    """GPTQModel parses meta["gptaq"] as its GPTAQConfig (a dict or None) and refuses a bare number: every
    checkpoint quantized with the default (alpha 1) failed to load there."""
    assert QuantConfig(bits=4, group_size=32).to_dict()["meta"]["gptaq"] == {"alpha": 1.0}
    assert QuantConfig(bits=4, group_size=32, gptaq=0.0).to_dict()["meta"]["gptaq"] is None
