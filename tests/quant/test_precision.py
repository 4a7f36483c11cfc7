"""Per-module precision: rules in the config (GPTQModel's `dynamic`), --keep presets, crucial selection,
bad rules refused, and LoRA on a mixed model."""

import json

import pytest
import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from gptqlora.adapters import GPTQLoraConfig, GPTQLoraLinear, get_peft_model
from gptqlora.checkpoint import QuantConfig, QuantConfigError, load_quantized, read_quant_config, save_quantized
from gptqlora.cli import main
from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.quant.precision import (PRESETS, build_rules, check_precision_first, check_rules, crucial_types,
                                      parse_rule, read_errors)
from tiny import train_steps

NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
    "mlp.up_proj", "mlp.down_proj")]


def test_first_matching_rule_decides_like_gptqmodel():
    cfg = QuantConfig(bits=2, group_size=32, dynamic={
        r"-:.*\.0\.mlp\.down_proj$": {},
        r"+:.*down_proj$": {"bits": 8, "group_size": 64},
        r".*mlp\..*": {"bits": 4},  # no prefix: positive, as in GPTQModel
    })
    assert cfg.for_module("model.layers.0.mlp.down_proj") is None
    assert cfg.for_module("model.layers.1.mlp.down_proj") == {"bits": 8, "group_size": 64, "desc_act": False,
                                                              "sym": True}
    assert cfg.for_module("model.layers.1.mlp.up_proj")["bits"] == 4  # the later rule: no merging of matches
    assert cfg.for_module("model.layers.1.self_attn.q_proj") == {"bits": 2, "group_size": 32, "desc_act": False,
                                                                 "sym": True}


def test_rules_from_presets_and_rule_texts():
    rules = build_rules(["ffn", r".*\.0\.self_attn\.q_proj"], [".*k_proj=bits:8,sym:false", ".*o_proj=skip"])
    assert list(rules) == [PRESETS["ffn"], r"-:.*\.0\.self_attn\.q_proj", "+:.*k_proj", "-:.*o_proj"]
    assert rules["+:.*k_proj"] == {"bits": 8, "sym": False}
    cfg = QuantConfig(bits=2, dynamic=rules)
    kept = [n for n in NAMES if cfg.for_module(n) is None]
    assert kept == [n for n in NAMES if "mlp" in n or n.endswith("o_proj") or n == "model.layers.0.self_attn.q_proj"]
    assert parse_rule("a=fp16") == ("-:a", {})
    for bad in ("noequals", "x=bits", "x=bits:two", "x=color:red", "x=sym:maybe"):
        with pytest.raises(QuantConfigError, match="--rule"):
            parse_rule(bad)


def test_bad_rules_are_refused():
    with pytest.raises(QuantConfigError, match="matches no module"):
        check_rules({"-:.*dense_h_to_4h": {}}, NAMES, "gptq")
    with pytest.raises(QuantConfigError, match="conflicting.*never applies.*put the narrower rule first"):
        check_rules(build_rules(["ffn"], [".*down_proj=bits:8"]), NAMES, "gptq")
    with pytest.raises(QuantConfigError, match="conflicting"):  # the same regex, kept and set to 8 bit
        check_rules(build_rules([".*q_proj"], [".*q_proj=bits:8"]), NAMES, "gptq")
    with pytest.raises(QuantConfigError, match="conflicting"):
        build_rules(rules=[".*q_proj=bits:8", ".*q_proj=bits:4"])
    with pytest.raises(QuantConfigError, match="not a valid regex"):
        QuantConfig(dynamic={"-:(": {}})
    with pytest.raises(QuantConfigError, match="unknown setting"):
        QuantConfig(dynamic={".*": {"bitz": 3}})
    with pytest.raises(QuantConfigError, match="unsupported bits=5"):
        QuantConfig(dynamic={".*": {"bits": 5}})
    check_rules(build_rules(["ffn"], [r".*\.0\.mlp\.down_proj=skip"]), NAMES, "gptq")  # redundant, same outcome: ok


def test_keep_and_rules_are_checked_before_any_work(tiny_dir):
    """quantize checks --keep and --rule against the module names its config gives (no weights, no calibration);
    `crucial` waits for its measurement, and a --keep that is no regex fails when the options are made."""
    from transformers import AutoConfig

    from gptqlora.quant.options import QuantizeOptions

    config = AutoConfig.from_pretrained(tiny_dir)
    check_precision_first(["crucial", "ffn"], [".*q_proj=bits:8"], None, config, "gptq")
    with pytest.raises(QuantConfigError, match="rule 'nonsense' matches no module of this model \\(full"):
        check_precision_first(["crucial", "nonsense"], [], None, config, "gptq")  # no preset near: no hint
    with pytest.raises(QuantConfigError,
                       match=r"rule 'fnn' matches no module of this model \(did you mean --keep ffn\?\)"):
        check_precision_first(["fnn"], [], None, config, "gptq")  # a preset's typo
    with pytest.raises(QuantConfigError, match="rule 'atn' matches no module .*did you mean --keep attn"):
        check_precision_first(["atn"], [], None, config, "gptq")
    with pytest.raises(QuantConfigError, match="rule 'fnn' matches no module of this model \\(full"):
        check_precision_first([], ["fnn=bits:8"], None, config, "gptq")  # a --rule is no preset: no hint
    with pytest.raises(QuantConfigError, match="conflicting"):
        check_precision_first(["ffn"], [".*down_proj=bits:8"], None, config, "gptq")
    # crucial keeps every down_proj first, so the skip rule is only redundant: no conflict before measuring
    check_precision_first(["crucial"], [".*proj=bits:8", ".*down_proj=skip"], None, config, "gptq")
    with pytest.raises(QuantConfigError, match="conflicting"):
        check_precision_first([], [".*proj=bits:8", ".*down_proj=skip"], None, config, "gptq")
    with pytest.raises(QuantConfigError, match=r"--keep \(: not a valid regex"):
        QuantizeOptions(keep=["("])


def test_crucial_is_down_proj_and_the_two_worst_attention_types():
    errors = {n: 1.0 for n in NAMES}
    errors |= {"model.layers.0.self_attn.v_proj": 9.0, "model.layers.1.self_attn.v_proj": 8.0,
               "model.layers.1.self_attn.k_proj": 12.0, "model.layers.0.mlp.up_proj": 100.0}
    assert crucial_types(errors) == ["v_proj", "k_proj"]  # summed over blocks: v 17, k 13, q 2, o 2
    cfg = QuantConfig(dynamic=build_rules(["crucial"], errors=errors))
    kept = {n.split(".", 3)[3] for n in NAMES if cfg.for_module(n) is None}
    assert kept == {"mlp.down_proj", "self_attn.v_proj", "self_attn.k_proj"}


def _calib(tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"the quick brown fox {i} jumps over the dog"}) for i in range(40)))
    return calib


def _quantize(tiny_dir, out, calib, *extra):
    return main(["quantize", str(tiny_dir), str(out), "--bits", "2", "--group-size", "32", "--calibration",
                 str(calib), "--nsamples", "3", "--seqlen", "32", *extra])


@pytest.fixture(scope="module")
def keep_ffn(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keep")
    assert _quantize(tiny_dir, tmp / "q", _calib(tmp), "--keep", "ffn") == 0
    return tmp / "q"


def test_keep_ffn_leaves_the_mlp_in_fp16_and_round_trips(keep_ffn, tmp_path, capsys):
    report = json.loads((keep_ffn / "quant_report.json").read_text())
    assert len(report["kept"]) == 6 and report["summary"]["quantized_modules"] == 8
    model = load_quantized(keep_ffn, device="cpu", dtype=torch.float32)
    for block in model.model.layers:
        assert all(type(getattr(block.mlp, p)) is nn.Linear for p in ("gate_proj", "up_proj", "down_proj"))
        assert all(isinstance(getattr(block.self_attn, p), QuantLinear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    cfg = read_quant_config(keep_ffn)
    assert cfg.dynamic == {PRESETS["ffn"]: {}}
    assert json.loads((keep_ffn / "quantize_config.json").read_text())["dynamic"] == {PRESETS["ffn"]: {}}

    save_quantized(model, tmp_path / "again")
    again = load_quantized(tmp_path / "again", device="cpu", dtype=torch.float32)
    assert read_quant_config(tmp_path / "again").dynamic == cfg.dynamic
    ids = torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_lora_trains_on_a_mixed_model(keep_ffn):
    model = load_quantized(keep_ffn, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    pm = get_peft_model(model, GPTQLoraConfig(r=4, lora_dropout=0.0))
    block = pm.base_model.model.model.layers[0]
    assert isinstance(block.self_attn.q_proj, GPTQLoraLinear)  # quantized: GPTQ-LoRA
    assert isinstance(block.mlp.down_proj, PeftLoraLinear) and not isinstance(block.mlp.down_proj, GPTQLoraLinear)
    losses = train_steps(pm, steps=5, lr=5e-3, vocab=model.config.vocab_size)
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None or not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)


def test_keep_crucial_uses_the_report(tiny_dir, keep_ffn, tmp_path):
    # a report of a plain 2-bit run: its two worst attention types (summed over blocks) are kept with down_proj
    calib = _calib(tmp_path)
    assert _quantize(tiny_dir, tmp_path / "plain", calib) == 0
    report = tmp_path / "plain" / "quant_report.json"
    errors = read_errors(report)
    want = set(crucial_types(errors)) | {"down_proj"}
    assert _quantize(tiny_dir, tmp_path / "crucial", calib, "--keep", "crucial", "--crucial-from", str(report)) == 0
    cfg = read_quant_config(tmp_path / "crucial")
    kept = {n.rsplit(".", 1)[-1] for n in errors if cfg.for_module(n) is None}
    assert kept == want and len(want) == 3
    model = load_quantized(tmp_path / "crucial", device="cpu", dtype=torch.float32)
    types = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules() if n.endswith("_proj")}
    assert {t for t, c in types.items() if c is nn.Linear} == want


def test_keep_crucial_measures_when_no_report_is_given(tiny_dir, tmp_path):
    assert _quantize(tiny_dir, tmp_path / "q", _calib(tmp_path), "--keep", "crucial") == 0
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    kept = {n.rsplit(".", 1)[-1] for n in report["kept"]}
    assert "down_proj" in kept and len(kept) == 3 and kept - {"down_proj"} <= {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("extra,expect", [
    (["--keep", ".*dense_4h"], "matches no module"),
    (["--keep", "ffn", "--rule", ".*down_proj=bits:8"], "conflicting precision rules"),
    (["--rule", ".*=bits:5"], "unsupported bits=5"),
    (["--keep", "crucial", "--crucial-from", "nowhere.json"], "nowhere.json: file not found"),
    (["--crucial-from", "x.json"], "--keep crucial"),
    (["--method", "spqr", "--outlier-fraction", "0.5"], "must be in (0, 0.1]"),
    (["--method", "spqr", "--outlier-fraction", "0"], "must be in (0, 0.1]"),
    (["--method", "spqr", "--outlier-fraction", "0.01", "--outlier-threshold", "0.2"], "not both"),
    (["--outlier-fraction", "0.01"], "apply to --method spqr"),
])
def test_bad_precision_input_is_one_clear_line(tiny_dir, tmp_path, capsys, extra, expect):
    rc = _quantize(tiny_dir, tmp_path / "q", _calib(tmp_path), *extra)
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_rule_order_survives_both_config_files(tiny_dir, tmp_path):
    # "z..." sorts after "a...": a writer that sorted keys would swap which rule decides down_proj
    rules = [r"z*.*down_proj=bits:8", r"a*.*_proj=bits:4"]
    assert _quantize(tiny_dir, tmp_path / "q", _calib(tmp_path), *sum((["--rule", r] for r in rules), [])) == 0
    for f in ("config.json", "quantize_config.json"):
        raw = json.loads((tmp_path / "q" / f).read_text())
        dyn = raw.get("quantization_config", raw)["dynamic"]
        assert list(dyn) == ["+:z*.*down_proj", "+:a*.*_proj"], f
    model = load_quantized(tmp_path / "q", device="cpu")
    assert model.model.layers[0].mlp.down_proj.bits == 8 and model.model.layers[0].mlp.up_proj.bits == 4


def test_split_fused_units_are_found():
    from gptqlora.quant.precision import split_fused_units

    crucial = QuantConfig(bits=2, dynamic={r"-:.*\.(down_proj|v_proj|o_proj)$": {}})
    split = split_fused_units(crucial, NAMES)
    assert split == ["model.layers.0.self_attn (q_proj: 2, k_proj: 2, v_proj: fp16)",
                     "model.layers.1.self_attn (q_proj: 2, k_proj: 2, v_proj: fp16)"]
    assert split_fused_units(QuantConfig(bits=2, dynamic={PRESETS["ffn"]: {}}), NAMES) == []


def test_export_refuses_a_split_qkv_for_vllm(tiny_dir, tmp_path):
    from gptqlora.commands.export import ExportError, export_vllm
    from gptqlora.data.templates import PromptTemplate
    from gptqlora.quant.driver import quantize_model
    from gptqlora.run import Run
    from tiny import calibration_samples, char_tokenizer

    base = tmp_path / "base"
    quantize_model(tiny_dir, base, QuantConfig(bits=4, group_size=32, dynamic={r"-:.*\.v_proj$": {}}),
                   calibration_samples(2, 16), device="cpu", progress=False)
    run = Run.create(tmp_path / "run")
    run.record(base, [], [], PromptTemplate.load("alpaca"))
    run.save_adapter(get_peft_model(load_quantized(base, device="cpu"), GPTQLoraConfig(r=8)))
    run.save_tokenizer(char_tokenizer())
    with pytest.raises(ExportError, match=r"vLLM fuses different settings.*v_proj: fp16"):
        export_vllm(run.root, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_siblings_of_different_bits_fuse_correctly(tiny_dir, tmp_path):
    from gptqlora.adapters.siblings import unlink_siblings
    from gptqlora.quant.driver import quantize_model
    from tiny import calibration_samples

    out = tmp_path / "q"
    quantize_model(tiny_dir, out, QuantConfig(bits=4, group_size=32, dynamic={r"+:.*q_proj$": {"bits": 8}}),
                   calibration_samples(2, 16), device="cpu", progress=False)
    pm = get_peft_model(load_quantized(out, device="cpu", dtype=torch.float32), GPTQLoraConfig(r=4, lora_dropout=0.0))
    attn = pm.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.base_layer.bits == 8 and attn.k_proj.base_layer.bits == 4 and attn.q_proj.siblings is not None
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        fused = pm(ids).logits
        unlink_siblings(pm)
        torch.testing.assert_close(pm(ids).logits, fused, rtol=1e-5, atol=1e-5)


def test_spqr_takes_per_module_rules(tiny_dir, tmp_path):
    """SpQR honours the rules as GPTQ does (docs/results.md, session 24: a 4-bit base on some modules, 3 bits on
    the rest): each module has its rule's bits and group, a kept one stays fp16, the report's average counts each
    module at its own bits, the checkpoint round-trips, and LoRA trains on it."""
    from gptqlora.nn.spqr_linear import SpQRLinear

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), str(out), "--method", "spqr", "--bits", "3", "--group-size", "16",
                 "--outlier-fraction", "0.01", "--rule", ".*down_proj=bits:4,group_size:32", "--keep", r".*\.o_proj",
                 "--calibration", str(_calib(tmp_path)), "--nsamples", "3", "--seqlen", "32"]) == 0
    model = load_quantized(out, device="cpu", dtype=torch.float32)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (SpQRLinear, nn.Linear)) and ".layers." in n}
    for name, m in mods.items():
        if name.endswith("o_proj"):
            assert type(m) is nn.Linear, name
        else:
            assert isinstance(m, SpQRLinear), name
            assert (m.bits, m.group_size) == ((4, 32) if name.endswith("down_proj") else (3, 16)), name
    report = json.loads((out / "quant_report.json").read_text())
    quantized = [m for m in mods.values() if isinstance(m, SpQRLinear)]
    weights = sum(m.in_features * m.out_features for m in quantized)
    expect = sum(m.in_features * m.out_features * m.average_bits for m in quantized) / weights
    assert report["summary"]["avg_bits_quantized"] == pytest.approx(expect, abs=1e-3)
    assert {report["modules"][n]["bits"] for n in report["modules"] if n.endswith("down_proj")} == {4}

    save_quantized(model, tmp_path / "again")
    again = load_quantized(tmp_path / "again", device="cpu", dtype=torch.float32)
    ids = torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    torch.manual_seed(0)
    pm = get_peft_model(again, GPTQLoraConfig(r=4, lora_dropout=0.0))
    losses = train_steps(pm, steps=5, lr=5e-3, vocab=again.config.vocab_size)
    assert losses[-1] < losses[0] - 0.1
