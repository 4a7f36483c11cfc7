"""`gptqlora export RUN_DIR --format vllm`: an adapter and base that vLLM serves as they are.

vLLM's LoRA support has limits (its documentation and `vllm/lora`): a rank among its supported maximum
ranks, no `modules_to_save`, no DoRA, no LoRA bias, target modules it knows; and its fast GPTQ kernels want
symmetric quantization in the v1 `gptq` format. QA-LoRA adapters (pooled inputs) are converted to ordinary
LoRA: lora_A repeated across each group and rescaled, which computes the same update.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gptqlora.commands.args import add_option

if TYPE_CHECKING:  # torch, peft and the layers load in `_convert` and `export_vllm`: `--help` needs none of them
    import torch

log = logging.getLogger(__name__)

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                "gate_up_proj", "embed_tokens", "lm_head"}


class ExportError(ValueError):
    pass


def nearest_rank(r: int) -> int:
    """The smallest vLLM rank >= r (padding with zeros keeps the adapter's function), else the largest."""
    return next((x for x in VLLM_RANKS if x >= r), VLLM_RANKS[-1])


def check_vllm_adapter(config: dict) -> list[str]:
    """What vLLM would refuse in an adapter_config.json, each with its fix."""
    problems = []
    r = int(config.get("r", 0))
    if r not in VLLM_RANKS:
        problems.append(f"rank r={r} is not one vLLM accepts {VLLM_RANKS}: use r={nearest_rank(r)} (retrain "
                        f"with --lora_r {nearest_rank(r)}, or export with --pad-rank, which zero-pads exactly)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} is not supported by vLLM: train without it")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM")
    if config.get("lora_bias"):
        problems.append("LoRA bias (lora_bias=True) is not supported by vLLM")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    unknown = sorted(set(targets) - VLLM_TARGETS)
    if unknown:
        problems.append(f"target modules {unknown} are not among those vLLM adapts for LLaMA ({sorted(VLLM_TARGETS)})")
    if config.get("use_qalora"):
        problems.append("QA-LoRA (use_qalora) is not a vLLM adapter type: export converts it to plain LoRA")
    return problems


def _convert(config: dict, tensors: dict[str, torch.Tensor], pad_rank: bool) -> tuple[dict, dict]:
    """QA-LoRA -> plain LoRA, and rank padding, both exact."""
    import torch

    from gptqlora.adapters.layer import expand_qalora_a

    config, tensors = dict(config), dict(tensors)
    if config.get("use_qalora"):
        gs = int(config["qalora_group_size"])
        for k, a in tensors.items():
            if ".lora_A." in k:
                tensors[k] = expand_qalora_a(a, gs).to(a.dtype)
        config["use_qalora"] = False
    r = int(config["r"])
    if pad_rank and r not in VLLM_RANKS:
        new_r = nearest_rank(r)
        if new_r < r:
            raise ExportError(f"rank {r} is above vLLM's largest ({VLLM_RANKS[-1]}); retrain with a smaller rank")
        for k, t in tensors.items():
            if ".lora_A." in k:  # (r, K): zero rows
                tensors[k] = torch.cat([t, t.new_zeros(new_r - r, t.shape[1])])
            elif ".lora_B." in k:  # (N, r): zero columns
                tensors[k] = torch.cat([t, t.new_zeros(t.shape[0], new_r - r)], dim=1)
        # keep scaling alpha/r: a larger r needs a proportionally larger alpha
        config["lora_alpha"] = config["lora_alpha"] * new_r / r if not config.get("use_rslora") else \
            config["lora_alpha"] * (new_r / r) ** 0.5
        config["r"] = new_r
    return config, tensors


def unaligned_groups(qcfg, in_features: dict[str, int]) -> list[str]:
    """Quantized modules whose input width (module name -> K) is not a whole number of their groups, each as
    'NAME: K inputs in groups of G'; vLLM's GPTQ layer raises on these ("input size is not aligned")."""
    out = []
    for name, k in sorted(in_features.items()):
        settings = qcfg.for_module(name)
        if settings is not None and settings["group_size"] > 0 and k % settings["group_size"]:
            out.append(f"{name}: {k} inputs in groups of {settings['group_size']}")
    return out


def export_vllm(run_dir: str | Path, out_dir: str | Path, pad_rank: bool = False, name: str | None = None,
                overwrite: bool = False) -> Path:
    """OUT/adapter (PEFT LoRA vLLM loads), OUT/base (the symmetric v1 GPTQ base), OUT/README.md (the command)."""
    from safetensors.torch import load_file, save_file

    from gptqlora.adapters.config import standard_adapter_config
    from gptqlora.adapters.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from gptqlora.adapters.saved import SavedAdapter
    from gptqlora.checkpoint.config import read_quant_config
    from gptqlora.checkpoint.io import atomic_output_dir
    from gptqlora.commands.merging import MergedSource
    from gptqlora.nn.registry import FORMATS
    from gptqlora.paths import check_output, require_dir
    from gptqlora.run import Run

    require_dir(run_dir, "RUN_DIR", "run folder")
    run = Run.open(run_dir)
    base, adapter = run.base_dir(), run.adapter()
    check_output(out_dir, "--out", {f"RUN_DIR {run_dir}": run.root, f"the run's base {base}": base},
                 overwrite=overwrite, kind="export")
    MergedSource(base, SavedAdapter(adapter)).check_shapes()  # the adapter fits this base, as merge/chat check
    qcfg = read_quant_config(base)
    requantize = (f"gptqlora merge {run_dir} --to gptq --bits {qcfg.bits} --group-size {qcfg.group_size} --sym "
                  f"--out DIR")
    if not qcfg.sym:
        raise ExportError(f"{base} is asymmetric: vLLM's fast GPTQ path needs symmetric weights. Merge and "
                          f"re-quantize first: {requantize}")
    if not FORMATS.lookup(qcfg.method, qcfg.format).format.universal:
        raise ExportError(f"{base} is in the {qcfg.format} format; vLLM reads the v1 'gptq' format. Merge and "
                          f"re-quantize first: {requantize} (symmetric writes v1), or re-save the base with "
                          f"gptqlora.save_quantized(model, DIR, QuantConfig(..., format='gptq'))")
    from gptqlora.checkpoint.io import SafetensorsSource

    src = SafetensorsSource(base)
    keys = src.keys()
    misfit = unaligned_groups(qcfg, {k[:-len(".g_idx")]: src.shape(k)[0] for k in keys if k.endswith(".g_idx")})
    if misfit:
        raise ExportError(f"{base}: {misfit[0]}{f' (and {len(misfit) - 1} more)' if len(misfit) > 1 else ''}; "
                          f"vLLM's GPTQ layer refuses a group that does not divide the input width. Re-quantize "
                          f"with one that does (128 for LLaMA-family models): gptqlora merge {run_dir} --to gptq "
                          f"--bits {qcfg.bits} --group-size 128 --sym --out DIR")
    if qcfg.dynamic:  # vLLM fuses q/k/v and gate/up and reads one setting per fused module
        from gptqlora.quant.precision import split_fused_units

        names = {k.rsplit(".", 1)[0] for k in keys if k.endswith((".weight", ".qweight")) and ".layers." in k}
        split = split_fused_units(qcfg, names)
        if split:
            raise ExportError(f"{base}: its precision rules give modules that vLLM fuses different settings, e.g. "
                              f"{split[0]} ({len(split)} such unit(s)); quantize q/k/v alike and gate/up alike "
                              f"(e.g. --keep attn or --keep ffn instead of --keep crucial) for vLLM")
    config = standard_adapter_config(json.loads((adapter / ADAPTER_CONFIG).read_text()))
    config["base_model_name_or_path"] = "../base"  # OUT/base, relative to OUT/adapter: moves with the export
    config, tensors = _convert(config, load_file(adapter / ADAPTER_WEIGHTS), pad_rank)
    problems = check_vllm_adapter(config)
    if problems:
        raise ExportError(f"{adapter}: vLLM would refuse this adapter:\n  - " + "\n  - ".join(problems))
    name = name or Path(run_dir).resolve().name
    with atomic_output_dir(out_dir, overwrite, checked=True) as tmp:
        (tmp / "adapter").mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter" / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / "adapter" / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        shutil.copytree(base, tmp / "base", ignore=shutil.ignore_patterns("quant_report.json", ".gptqlora*",
                                                                         ".*.tmp-*"))
        (tmp / "README.md").write_text(
            f"# {name}: vLLM export of {Path(run_dir).resolve()}\n\n"
            f"GPTQ {qcfg.bits}-bit base (symmetric, group {qcfg.group_size}) and a LoRA adapter of rank "
            f"{config['r']}.\n\n```bash\nvllm serve ./base --quantization gptq --enable-lora \\\n"
            f"    --lora-modules {name}=./adapter --max-lora-rank {config['r']}\n```\n\n"
            f"Then ask for the adapter by name: `\"model\": \"{name}\"` in the OpenAI-compatible request.\n")
    return Path(out_dir)


DESCRIPTION = ("Write OUT/adapter (a PEFT LoRA adapter checked against vLLM's limits), OUT/base (the symmetric "
               "GPTQ base) and OUT/README.md with the vllm command.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder written by `gptqlora finetune`")
    add_option(p, "format", choices=("vllm",), default="vllm", help="target engine (default vllm)")
    add_option(p, "out", required=True, help="output directory")
    add_option(p, "pad_rank", action="store_true",
               help="zero-pad a rank vLLM refuses up to the next one it accepts (exact)")
    add_option(p, "name", help="the adapter's name in the vllm command (default: the run folder's name)")
    add_option(p, "overwrite", action="store_true",
               help="replace --out if it exists (only a folder gptqlora wrote, never one with other files)")


def run(args: argparse.Namespace) -> int:
    out = export_vllm(args.run_dir, args.out, args.pad_rank, args.name, args.overwrite)
    sys.stdout.write(f"wrote {out}; see {out}/README.md for the vllm command\n")
    return 0
