"""Layer-by-layer quantization of a Hugging Face causal LM, streaming one block at a time.

Only the embeddings, the final norm, lm_head and one decoder block are in memory at once: each block's
weights are read from the (sharded) safetensors source, quantized group by group in true-sequential order
(qkv -> o -> gate/up -> down), its quantized outputs become the next block's inputs, and its packed tensors
are written out before the next block is read.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from gptqlora.checkpoint.checkpoint import build_empty_model, layer_tensors, write_configs
from gptqlora.checkpoint.config import QuantConfig
from gptqlora.checkpoint.io import (CheckpointError, SafetensorsSource, ShardedWriter, atomic_output_dir,
                                    copy_side_files)
from gptqlora.data.calibration import CalibrationError
from gptqlora.devices import resolve_device
from gptqlora.formats.base import FormatError
from gptqlora.nn.blocks import capture_block_inputs as _capture_block_inputs
from gptqlora.nn.blocks import first_output as _first
from gptqlora.nn.registry import FORMATS, Entry
from gptqlora.paths import require_dir
from gptqlora.quant.memory import release_freed_memory
from gptqlora.quant.model_utils import decoder_layers, linear_groups
from gptqlora.quant.precision import check_rules, layer_stats, quantizable_names, split_fused_units, summarize
from gptqlora.quant.solvers import SOLVERS

log = logging.getLogger(__name__)


class TensorSource(Protocol):
    """Where the fp weights come from: a safetensors dir, or a merge that computes them on the fly."""

    def keys(self) -> list[str]: ...
    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor: ...


@dataclass
class QuantizeReport:
    config: dict
    calibration: dict
    modules: dict[str, dict] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # linears left in full precision (precision rules)
    summary: dict = field(default_factory=dict)  # average bits per weight, outlier fraction (SpQR)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def check_token_ids(samples: list[torch.Tensor], vocab_size: int) -> None:
    """Calibration token ids must index the embedding (a file of `input_ids` for another tokenizer)."""
    for i, s in enumerate(samples):
        if s.numel() and (int(s.max()) >= vocab_size or int(s.min()) < 0):
            raise CalibrationError(f"calibration sample {i} has token id {int(s.max())} outside the model's "
                                   f"vocabulary (0..{vocab_size - 1}): its input_ids come from another tokenizer")


def quantize_model(model_dir: str | Path, out_dir: str | Path, qcfg: QuantConfig, samples: list[torch.Tensor],
                   device: str | torch.device | None = None, dtype: torch.dtype = torch.float16,
                   method: str = "gptq", source: TensorSource | None = None, overwrite: bool = False,
                   max_shard_size: int | str = "2GB", progress: bool = True,
                   config: PretrainedConfig | None = None, solver_options: dict | None = None) -> QuantizeReport:
    """Quantize the model in `model_dir` (its config; weights from its safetensors or from `source`).

    `config` replaces model_dir's config.json (a merge passes the base's, minus its quantization_config).

    `method` names a solver (`SOLVERS`: "gptq", "rtn" or "spqr"; `solver_options` are passed to its
    `quantize`, e.g. SpQR's outlier_fraction). Writes a checkpoint in `qcfg.format` (+ tokenizer
    files and quant_report.json) to `out_dir` atomically and returns the report.
    """
    t0 = time.time()
    if method not in SOLVERS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {tuple(SOLVERS)}")
    entry = FORMATS.lookup(qcfg.method, qcfg.format)
    if not hasattr(entry.layer, "from_codes") or (method == "spqr") != (entry.format.method == "spqr"):
        raise ValueError(f"the {qcfg.format} format cannot be written by the {method} quantizer")
    device = resolve_device(device)
    work_dtype = torch.float32 if device.type == "cpu" else dtype  # fp16 matmuls are slow on CPU
    model_dir = require_dir(model_dir, "model folder")
    config = config if config is not None else AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        raise CheckpointError(f"{model_dir}: this model is already quantized (config.json has "
                              f"quantization_config); start from the fp16/bf16 model")
    check_token_ids(samples, config.vocab_size)
    src = source if source is not None else SafetensorsSource(model_dir)
    model = build_empty_model(config, work_dtype)
    layers_name, layers = decoder_layers(model)
    names = quantizable_names(layers_name, layers)
    check_rules(qcfg.dynamic, names, qcfg.format)
    split = split_fused_units(qcfg, names) if qcfg.dynamic else []
    if split:
        log.warning("precision rules give modules that vLLM fuses different settings, e.g. %s (%d unit(s)): "
                    "gptqlora and GPTQModel load this, `export --format vllm` will refuse it", split[0], len(split))
    report = QuantizeReport(config=qcfg.to_dict(), calibration={
        "nsamples": len(samples), "tokens": int(sum(s.numel() for s in samples))})

    with atomic_output_dir(out_dir, overwrite, inputs={"model folder": model_dir}) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        _load_outside_blocks(model, src, layers_name, device, work_dtype, writer, dtype)
        inputs = _capture_block_inputs(model, layers, samples)
        # asymmetric calibration (GPTAQ) also follows the fp model: its block inputs, and an fp copy of each block
        asym = method in ("gptq", "spqr") and qcfg.gptaq > 0
        fp_inputs = [h for h, _ in inputs] if asym else None
        bar = tqdm(range(len(layers)), desc="quantizing blocks", unit="block", disable=not progress)
        for i in bar:
            prefix = f"{layers_name}.{i}"
            block = _load_block(layers[i], src, prefix, device, work_dtype)
            fp_block = copy.deepcopy(block) if asym else None
            fp_out, packed = _quantize_block(block, prefix, inputs, qcfg, entry, method, report,
                                             solver_options or {}, fp_block, fp_inputs)
            with torch.no_grad():
                if asym:
                    fp_inputs = [_first(fp_block(h, **kw)) for h, (_, kw) in zip(fp_inputs, inputs)]
                inputs = [(_first(block(h, **kw)), kw) for h, kw in inputs]  # quantized outputs feed block i+1
            err = _relative_error([h for h, _ in inputs], fp_out)
            report.blocks.append({"index": i, "rel_output_error": err})
            bar.set_postfix(rel_err=f"{err:.4f}")
            log.info("block %d: relative output error %.5f", i, err)
            for name, t in block.state_dict().items():
                full = f"{prefix}.{name}"
                if not any(full in (f"{p}.weight", f"{p}.bias") for p in packed):
                    writer.add(full, t.to(dtype) if t.is_floating_point() else t)
            for name, layer in packed.items():
                for k, v in layer_tensors(name, layer, entry.format).items():
                    writer.add(k, v)
            layers[i].to("meta")  # free the block before reading the next
            del block, packed, fp_out, fp_block
            release_freed_memory()
        writer.close()
        report.summary = summarize(report)
        write_configs(tmp, config.to_dict(), qcfg)
        copy_side_files(model_dir, tmp)
        report.seconds = round(time.time() - t0, 2)
        (tmp / "quant_report.json").write_text(report.to_json())
    return report


def _load_outside_blocks(model: nn.Module, src: TensorSource, layers_name: str, device: torch.device,
                         work_dtype: torch.dtype, writer: ShardedWriter, dtype: torch.dtype) -> None:
    """Embeddings, final norm, lm_head: load for the forward pass and write them out as they are."""
    state = {}
    for k in src.keys():
        if k.startswith(layers_name + "."):
            continue
        t = src.get(k, device)
        writer.add(k, t.to(dtype) if t.is_floating_point() else t)
        state[k] = t.to(work_dtype) if t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.device.type == "meta" and not name.startswith(layers_name + "."):
            raise CheckpointError(f"the checkpoint has no tensor '{name}'")
    for mod in model.modules():  # non-persistent buffers (rotary inv_freq) live on CPU until now
        for bname, b in mod.named_buffers(recurse=False):
            if b.device.type != "meta":
                setattr(mod, bname, b.to(device))


def _load_block(block: nn.Module, src: TensorSource, prefix: str, device: torch.device,
                work_dtype: torch.dtype) -> nn.Module:
    expected = set(block.state_dict())
    state = {}
    for name in expected:
        t = src.get(f"{prefix}.{name}", device)
        state[name] = t.to(work_dtype) if t.is_floating_point() else t
    block.load_state_dict(state, strict=True, assign=True)
    return block


def _module_cfg(qcfg: QuantConfig, entry: Entry, name: str, linear: nn.Linear) -> dict | None:
    """This module's quantization settings, or None when it stays in full precision."""
    mcfg = qcfg.for_module(name)
    if mcfg is None:
        return None
    try:
        entry.format.spec(linear.in_features, linear.out_features, mcfg["bits"], mcfg["group_size"])
    except FormatError as e:
        log.warning("%s: shape %dx%d cannot be packed (%s); kept in full precision", name, linear.out_features,
                    linear.in_features, e)
        return None
    return mcfg


def _quantize_block(block: nn.Module, prefix: str, inputs: list[tuple[torch.Tensor, dict]], qcfg: QuantConfig,
                    entry: Entry, method: str, report: QuantizeReport,
                    solver_options: dict, fp_block: nn.Module | None = None,
                    fp_inputs: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], dict]:
    """Quantize the block's linears group by group; their weights are replaced by the dequantized ones so
    later groups see quantized outputs. Returns (the block's full-precision outputs, packed layers).

    With `fp_block` (an unquantized copy) and `fp_inputs` (the fp model's inputs of this block), each
    linear's solver also gets what it sees in the fp model on the same tokens (asymmetric calibration)."""
    fp_out: list[torch.Tensor] = []
    packed: dict[str, nn.Module] = {}
    # asymmetric zeros stay off values the format cannot store (v1 cannot store a zero of 0)
    min_zero = 0 if qcfg.sym else getattr(entry.format, "smallest_zero", 0)
    for gi, group in enumerate(linear_groups(block, qcfg.true_sequential)):
        todo = {}  # name -> (linear, its settings), for the linears that get quantized
        for n in group:
            lin = block.get_submodule(n)
            cfg = _module_cfg(qcfg, entry, f"{prefix}.{n}", lin)
            if cfg is not None:
                todo[n] = (lin, cfg)
            else:
                report.kept.append(f"{prefix}.{n}")
                report.modules[f"{prefix}.{n}"] = {"bits": 16, "params": lin.weight.numel()}
        solvers = {n: SOLVERS[method](lin.weight) for n, (lin, _) in todo.items()}
        seen: dict[str, torch.Tensor] = {}  # this sample's inputs of the linears in the fp block
        hooks = [lin.register_forward_hook(lambda m, inp, out, g=solvers[n], n=n: g.add_batch(inp[0], seen.get(n)))
                 for n, (lin, _) in todo.items() if solvers[n].needs_inputs]
        if fp_block is not None and hooks:
            hooks += [fp_block.get_submodule(n).register_forward_hook(
                lambda m, inp, out, n=n: seen.__setitem__(n, inp[0])) for n in todo]
        if hooks or gi == 0:  # RTN needs no inputs, only the block's fp outputs for the report
            with torch.no_grad():
                for j, (h, kw) in enumerate(inputs):
                    if fp_block is not None and hooks:
                        fp_block(fp_inputs[j], **kw)
                    out = _first(block(h, **kw))
                    seen.clear()
                    if gi == 0:
                        fp_out.append(out)
        for hk in hooks:
            hk.remove()
        # SpQR's pass shares GPTQ's asymmetric target and its coordinate descent on the codes (opt-in there)
        extra = {"gptq": {"mse_select": qcfg.mse_select, "gptaq": qcfg.gptaq, "refit": qcfg.refit_scales,
                          "refit_rounds": qcfg.refit_rounds, "descent_passes": qcfg.descent},
                 "spqr": {"gptaq": qcfg.gptaq, "descent_passes": qcfg.descent}}.get(method, {})
        for n, (lin, cfg) in todo.items():
            t = time.time()
            res = solvers[n].quantize(bits=cfg["bits"], group_size=cfg["group_size"], sym=cfg["sym"],
                                      desc_act=cfg["desc_act"], static_groups=qcfg.static_groups,
                                      damp=qcfg.damp_percent, mse=qcfg.mse, min_zero=min_zero,
                                      group_aware=qcfg.act_group_aware, **extra, **solver_options)
            solvers[n] = None  # free the Hessian
            lin.weight.data = res.dequantize().to(lin.weight.dtype)
            layer = entry.layer.from_codes(**res.layer_kwargs(), group_size=cfg["group_size"], bits=cfg["bits"],
                                           bias=lin.bias)
            report.modules[f"{prefix}.{n}"] = {"bits": cfg["bits"], "group_size": cfg["group_size"],
                                               "error": res.error, "seconds": round(time.time() - t, 3),
                                               "params": lin.weight.numel(), **layer_stats(layer)}
            packed[f"{prefix}.{n}"] = layer
    return fp_out, packed


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((g.float() - w.float()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.float().pow(2).sum()) for w in want)
    return (num / den) ** 0.5 if den else 0.0
