"""The streaming merge of `gptqlora merge` (its options and command: `merge`): `merge_to_fp16`,
`merge_to_gptq` (merged, then quantized again) and `merge_exact` (a QA-LoRA adapter folded into the zeros).
`MergedSource`, the merged weights one tensor at a time, is also export's check that an adapter fits its base.

Everything streams: one layer's weights are in memory at a time, so merging a 65B model does not need
130 GB of host RAM. Packed layers are read through the format registry, whatever their format.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from gptqlora.adapters.model import AdapterError
from gptqlora.adapters.saved import SavedAdapter
from gptqlora.checkpoint.checkpoint import layer_tensors, read_layer, write_configs
from gptqlora.checkpoint.config import QuantConfig, read_quant_config
from gptqlora.checkpoint.io import SafetensorsSource, ShardedWriter, atomic_output_dir, copy_side_files
from gptqlora.devices import resolve_device
from gptqlora.nn.registry import FORMATS
from gptqlora.paths import check_output, require_dir, require_file
from gptqlora.run import Run

log = logging.getLogger(__name__)


class MergedSource:
    """The merged model's fp32 weights, computed one tensor at a time: a TensorSource for the writers and
    for the quantization driver (`merge --to gptq`)."""

    def __init__(self, base_dir: Path, adapter: SavedAdapter, device: str | torch.device = "cpu") -> None:
        self.src = SafetensorsSource(base_dir)
        self.qcfg = read_quant_config(base_dir)
        self.format = FORMATS.lookup(self.qcfg.method, self.qcfg.format).format
        self.adapter, self.device = adapter, torch.device(device)
        self.quantized = frozenset(self.format.layer_prefixes(self.src.keys()))
        plain = {k[: -len(".weight")] for k in self.src.keys() if k.endswith(".weight")}
        unknown = sorted(set(adapter.modules) - self.quantized - plain)
        if unknown:
            raise AdapterError(f"the adapter has weights for {unknown[:3]}, which the base {base_dir} does not "
                               f"have: an adapter for another base model")

    def keys(self) -> list[str]:
        """The merged model's tensor names: a packed layer's stored tensors become PREFIX.weight."""
        out = []
        for k in self.src.keys():
            if not self.format.owns(k, self.quantized):
                out.append(k)
            elif k.endswith("." + self.format.marker):
                out.append(f"{k[: -len(self.format.marker) - 1]}.weight")
        return out

    def get(self, key: str, device: str | torch.device | None = None) -> torch.Tensor:
        device = device or self.device
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        if prefix in self.quantized:
            w = self.layer(prefix).dequantize(torch.float32).t()  # (N, K)
        else:
            w = self.src.get(key, self.device)
            if prefix is None or prefix not in self.adapter.modules:
                return w.to(device)
            w = w.float()
        delta = self.adapter.delta(prefix)
        if delta is not None:
            if delta.shape != w.shape:
                raise AdapterError(f"{prefix}: the adapter's update is {tuple(delta.shape)} but the base layer is "
                                   f"{tuple(w.shape)}: an adapter for another base model")
            w = w + delta.to(w.device)
        return w.to(device)

    def layer(self, prefix: str) -> torch.nn.Module:
        """The packed base layer at `prefix` (shape from the file headers)."""
        return read_layer(self.src, prefix, self.qcfg, device=self.device)

    def check_shapes(self) -> None:
        """Every adapted layer's lora_A/lora_B fit the base layer (before any output is written)."""
        for prefix, ab in self.adapter.modules.items():
            if prefix in self.quantized:  # from the file headers: no weights read
                bits = (self.qcfg.for_module(prefix) or {"bits": self.qcfg.bits})["bits"]
                shapes = {s: self.src.shape(f"{prefix}.{s}") for s in self.format.stored
                          if f"{prefix}.{s}" in self.src}
                k, n = self.format.shape_from_headers(shapes, bits)
            else:
                n, k = self.src.shape(f"{prefix}.weight")[:2]
            a, b = ab.get("A"), ab.get("B")
            k_a = k // self.adapter.config.qalora_group_size if self.adapter.config.use_qalora and a is not None \
                else k
            if a is None or b is None or b.shape[0] != n or a.shape[1] != k_a or a.shape[0] != b.shape[1]:
                shapes = f"A {tuple(a.shape) if a is not None else None}, B {tuple(b.shape) if b is not None else None}"
                raise AdapterError(f"{prefix}: the adapter's {shapes} do not fit the base layer ({n}x{k}): an "
                                   f"adapter for another base model")


def _plain_config(base_dir: Path, dtype: torch.dtype) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(base_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    return config


def _open(run_dir: str | Path, out_dir: str | Path, overwrite: bool, calibration: str | None = None,
          kind: str = "merged model") -> tuple[Run, Path, SavedAdapter]:
    """The run, its base and adapter, with the output checked against them (`gptqlora.paths`) before any
    work: never the run itself, inside it, or a folder holding it or its base."""
    require_dir(run_dir, "RUN_DIR", "run folder")
    run = Run.open(run_dir)
    adapter, base = run.adapter(), run.base_dir()
    if calibration:
        require_file(calibration, "--calibration", "calibration file")
    check_output(out_dir, "--out", {f"RUN_DIR {run_dir}": run.root, f"the run's base {base}": base,
                                    f"--calibration {calibration}": calibration}, overwrite=overwrite, kind=kind)
    return run, base, SavedAdapter(adapter)


def merge_to_fp16(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                  max_shard_size: str = "2GB", overwrite: bool = False, device: str = "cpu") -> Path:
    """A plain transformers model (base + adapter merged) that loads without gptqlora."""
    run, base, adapter = _open(run_dir, out_dir, overwrite)
    src = MergedSource(base, adapter, device)
    src.check_shapes()
    with atomic_output_dir(out_dir, overwrite, checked=True) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        for key in tqdm(src.keys(), desc="merging", unit="tensor"):
            t = src.get(key, "cpu")
            writer.add(key, t.to(dtype) if t.is_floating_point() else t)
        writer.close()
        _plain_config(base, dtype).save_pretrained(tmp)
        copy_side_files(base, tmp)
        copy_side_files(run.root, tmp)  # the run's tokenizer (pad token etc.) wins
    log.info("merged %s into %s", run_dir, out_dir)
    return Path(out_dir)


def merge_to_gptq(run_dir: str | Path, out_dir: str | Path, qcfg: QuantConfig | None = None, options=None,
                  device: str | None = None, overwrite: bool = False, max_shard_size: str = "2GB") -> dict:
    """Merge, then quantize with `qcfg`/`options` (calibrated on the run's training data unless
    `options.calibration` is given). Returns the quantization report (per-block error against the fp16 merge)."""
    from gptqlora.quant.api import QuantizeOptions, TrainingData, quantize

    qcfg, options = qcfg or QuantConfig(), options or QuantizeOptions()
    run, base, adapter = _open(run_dir, out_dir, overwrite, options.calibration, "re-quantized model")
    files = [] if options.calibration else run.data_files()  # a moved run calibrates on its copies
    training = TrainingData(files, run.template(), run.cutoff_len)
    dev = resolve_device(device)
    src = MergedSource(base, adapter, dev)
    src.check_shapes()
    report = quantize(run.root, out_dir, qcfg, options, tokenizer=run.tokenizer(), training=training,
                      source=src, config=_plain_config(base, torch.float16), device=dev,
                      max_shard_size=max_shard_size, overwrite=overwrite)
    return {"blocks": report.blocks, "worst_block_rel_error": max(b["rel_output_error"] for b in report.blocks)}


def merge_exact(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                max_shard_size: str = "2GB") -> Path:
    """Fold a QA-LoRA adapter into the zeros: W' = s·(q - z) + D = s·(q - (z - D/s)) with D constant per
    (group, output) — exact, no re-quantization. The zeros become floats (the format's `fold_format`,
    gptq_v2_float_zeros for GPTQ), which gptqlora loads; other GPTQ loaders need integer zeros."""
    run, base, adapter = _open(run_dir, out_dir, overwrite, kind="merged model")
    if not adapter.config.use_qalora:
        raise AdapterError(f"{run_dir}: --exact needs an adapter trained with --use_qalora (this one is plain "
                           f"LoRA: use --to fp16 or --to gptq)")
    src = MergedSource(base, adapter)
    if src.format.fold_format is None:
        raise AdapterError(f"{base}: the {src.qcfg.format} format has no exact merge; use --to fp16 or --to gptq")
    out_format = FORMATS.lookup(src.qcfg.method, src.format.fold_format).format
    src.check_shapes()
    with atomic_output_dir(out_dir, overwrite, checked=True) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        for key in tqdm(src.src.keys(), desc="merging exactly", unit="tensor"):
            prefix = key.rpartition(".")[0]
            if not src.format.owns(key, src.quantized):
                if key.endswith(".bias") and prefix in src.quantized:
                    continue  # written with its layer
                t = src.get(key, "cpu")  # a plain linear the adapter touches gets its (exact) update
                writer.add(key, t.to(torch.float16) if prefix in adapter.modules else t)
            elif key.endswith("." + src.format.marker):  # every packed layer, rewritten in the output format
                layer = src.layer(prefix)
                if prefix in adapter.modules:
                    _fold(layer, prefix, adapter)
                for k, v in layer_tensors(prefix, layer, out_format).items():
                    writer.add(k, v)
        writer.close()
        src.qcfg.format = out_format.name
        write_configs(tmp, json.loads((base / "config.json").read_text()) | {"quantization_config": None}, src.qcfg)
        copy_side_files(base, tmp)
        copy_side_files(run.root, tmp)
    return Path(out_dir)


def _fold(layer: torch.nn.Module, prefix: str, adapter: SavedAdapter) -> None:
    gs = adapter.config.qalora_group_size
    if getattr(layer, "group_size", None) != gs or not hasattr(layer, "fold_into_zeros"):
        raise AdapterError(f"{prefix}: an exact merge needs the QA-LoRA group ({gs}) to equal the quantization "
                           f"group ({getattr(layer, 'group_size', None)}) and no act-order; use --to gptq instead")
    try:
        layer.fold_into_zeros(adapter.delta(prefix))  # (N, K), constant within each group of gs inputs
    except ValueError as e:
        raise AdapterError(f"{prefix}: {e}; use --to gptq instead") from None
