"""merge (fp16, re-quantized GPTQ, exact QA-LoRA) and export (vLLM): equal logits, clear refusals."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptqlora.adapters import AdapterError
from gptqlora.cli import main
from gptqlora.adapters.saved import SavedAdapter
from gptqlora.checkpoint.checkpoint import load_quantized
from gptqlora.checkpoint.config import QuantConfig
from gptqlora.commands.export import ExportError, check_vllm_adapter, export_vllm
from gptqlora.commands.merge import merge_exact, merge_to_fp16, merge_to_gptq
from gptqlora.quant.api import QuantizeOptions
from gptqlora.run import RunError, load_run
from runs import make_run

IDS = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    return make_run(tiny_dir, tmp_path_factory.mktemp("runs") / "lora", desc_act=True)


@pytest.fixture(scope="module")
def qarun(tiny_dir, tmp_path_factory):
    return make_run(tiny_dir, tmp_path_factory.mktemp("runs") / "qa", use_qalora=True, qalora_group_size=32)


def adapter_logits(run_dir):
    with torch.no_grad():
        return load_run(run_dir, device="cpu", dtype=torch.float32)(IDS).logits


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_fp_merge_matches_adapter_model(run, tmp_path, dtype, tol):
    out = merge_to_fp16(run, tmp_path / "m", dtype=dtype)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers
    with torch.no_grad():
        assert rel(merged(IDS).logits, adapter_logits(run)) < tol


def test_gptq_merge_loads_and_reports(run, tmp_path):
    rep = merge_to_gptq(run, tmp_path / "g", QuantConfig(bits=8, group_size=32), QuantizeOptions(nsamples=4, seqlen=32),
                        device="cpu")
    assert 0 < rep["worst_block_rel_error"] < 0.05
    q = load_quantized(tmp_path / "g", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert rel(q(IDS).logits, adapter_logits(run)) < 0.05


def test_exact_merge_equals_unmerged_qalora(qarun, tmp_path):
    out = merge_exact(qarun, tmp_path / "x")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == \
        "gptq_v2_float_zeros"
    q = load_quantized(out, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(q(IDS).logits, adapter_logits(qarun), rtol=1e-4, atol=1e-4)


def test_exact_merge_rewrites_unadapted_layers_too(tiny_dir, tmp_path):
    """A v1 base whose layers are not all adapted: every packed layer goes out in the output format."""
    part = make_run(tiny_dir, tmp_path / "part", use_qalora=True, qalora_group_size=32, target_modules=["q_proj"])
    q = load_quantized(merge_exact(part, tmp_path / "x"), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(q(IDS).logits, adapter_logits(part), rtol=1e-4, atol=1e-4)


def test_exact_merge_refuses_plain_lora(run, tmp_path):
    with pytest.raises(AdapterError, match="use_qalora"):
        merge_exact(run, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_export_vllm(run, qarun, tmp_path):
    out = export_vllm(run, tmp_path / "v")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert check_vllm_adapter(cfg) == [] and (out / "base" / "config.json").is_file()
    assert "vllm serve ./base --quantization gptq --enable-lora" in (out / "README.md").read_text()
    # QA-LoRA becomes ordinary LoRA with the same update
    qa = export_vllm(qarun, tmp_path / "vq")
    a, b = SavedAdapter(qarun / "adapter"), SavedAdapter(qa / "adapter")
    assert not b.config.use_qalora
    for m in a.modules:
        torch.testing.assert_close(a.delta(m), b.delta(m), rtol=1e-5, atol=1e-6)


def test_export_refuses_rank_with_fix_and_pads_exactly(tiny_dir, tmp_path):
    r12 = make_run(tiny_dir, tmp_path / "r12", r=12)
    with pytest.raises(ExportError, match=r"r=12 .*use r=16"):
        export_vllm(r12, tmp_path / "v")
    assert not (tmp_path / "v").exists()
    out = export_vllm(r12, tmp_path / "v", pad_rank=True)
    a, b = SavedAdapter(r12 / "adapter"), SavedAdapter(out / "adapter")
    assert b.config.r == 16
    for m in a.modules:
        torch.testing.assert_close(a.delta(m), b.delta(m), rtol=1e-5, atol=1e-6)


def test_export_refusals_give_commands_that_run(tiny_dir, tmp_path):
    """An asymmetric (v2) base: the hint names a merge command that merge accepts."""
    from gptqlora.cli import build_parser

    asym = make_run(tiny_dir, tmp_path / "asym", sym=False)
    with pytest.raises(ExportError, match="asymmetric") as e:
        export_vllm(asym, tmp_path / "v")
    hint = str(e.value).split("re-quantize first: ")[1].split()
    assert hint[:2] == ["gptqlora", "merge"] and "--sym" in hint
    args = build_parser("merge").parse_args(hint[1:])
    assert args.sym is True and args.to == "gptq" and args.bits == 4


# --- bad input ---------------------------------------------------------------------------------------

def test_run_without_adapter(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises(RunError, match="no trained adapter.*resume"):
        merge_to_fp16(broken, tmp_path / "m")
    assert main(["merge", str(broken), "--out", str(tmp_path / "m")]) == 2
    assert "no trained adapter" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_adapter_for_another_base(run, tiny_dir, tmp_path):
    from tiny import save_tiny_llama

    other = make_run(save_tiny_llama(tmp_path / "ofp", hidden=64, intermediate=128), tmp_path / "other")
    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    shutil.rmtree(mixed / "adapter")
    shutil.copytree(other / "adapter", mixed / "adapter")
    with pytest.raises(AdapterError, match="another base model"):
        merge_to_fp16(mixed, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_existing_target_refused_unless_overwrite(run, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # a folder holding the user's files is never replaced
        assert main(["merge", str(run), "--out", str(tmp_path / "m"), *extra]) == 2
        assert "did not write" in capsys.readouterr().err and (tmp_path / "m" / "keep.txt").is_file()
    assert main(["merge", str(run), "--out", str(tmp_path / "m2")]) == 0
    assert main(["merge", str(run), "--out", str(tmp_path / "m2")]) == 2  # ours: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(run), "--out", str(tmp_path / "m2"), "--overwrite"]) == 0
    assert (tmp_path / "m2" / "config.json").is_file()


def test_export_names_groups_that_do_not_divide_a_layers_inputs():
    """vLLM's GPTQ layer raises on an input width that is not a whole number of groups: export refuses first."""
    from gptqlora.commands.export import unaligned_groups

    widths = {"model.layers.0.self_attn.q_proj": 64, "model.layers.0.mlp.down_proj": 176}
    assert unaligned_groups(QuantConfig(bits=4, group_size=32), widths) == \
        ["model.layers.0.mlp.down_proj: 176 inputs in groups of 32"]
    assert unaligned_groups(QuantConfig(bits=4, group_size=16), widths) == []
    assert unaligned_groups(QuantConfig(bits=4, group_size=-1), widths) == []  # one group a column: always fits
    kept = QuantConfig(bits=4, group_size=32, dynamic={r"-:.*down_proj": {}})  # fp16: no groups
    assert unaligned_groups(kept, widths) == []
