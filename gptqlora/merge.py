"""`gptqlora merge`: fold a run's adapter into its base, layer by layer.

    --to fp16   dequantize the base, add B·A·scaling, write a plain Hugging Face model
    --to gptq   the same, then GPTQ-quantize it again into a standard GPTQ checkpoint
    --exact     QA-LoRA adapters only: fold the adapter into the quantized zeros, no re-quantization

Everything streams: one layer's weights are in memory at a time, so merging a 65B model does not need
130 GB of host RAM.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from gptqlora.adapters.layer import lora_delta
from gptqlora.adapters.model import AdapterError, parse_lora_key, read_adapter_config
from gptqlora.formats.gptq import FORMAT_V2_FLOAT_ZEROS, unpack_cols
from gptqlora.kernels.reference import dequantize
from gptqlora.quant.checkpoint import QUANT_TENSORS, read_packed, write_configs
from gptqlora.quant.config import QuantConfig, read_quant_config
from gptqlora.quant.io import SafetensorsSource, ShardedWriter, atomic_output_dir, copy_side_files
from gptqlora.run import adapter_path, base_path, read_run_info

log = logging.getLogger(__name__)


class Adapter:
    """A saved LoRA adapter's tensors per module, with its scaling (rank/alpha patterns, rsLoRA, QA-LoRA)."""

    def __init__(self, adapter_dir: Path) -> None:
        self.config = read_adapter_config(adapter_dir)
        self.modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_file(adapter_dir / "adapter_model.safetensors").items():
            parsed = parse_lora_key(key)
            if parsed:
                self.modules.setdefault(parsed[0], {})[parsed[1]] = t
        if not self.modules:
            raise AdapterError(f"{adapter_dir}: the adapter holds no lora_A/lora_B weights")

    def scaling(self, prefix: str) -> float:
        c, leaf = self.config, prefix.rsplit(".", 1)[-1]
        r = (c.rank_pattern or {}).get(leaf, c.r)
        alpha = (c.alpha_pattern or {}).get(leaf, c.lora_alpha)
        return alpha / r**0.5 if c.use_rslora else alpha / r

    def delta(self, prefix: str) -> torch.Tensor | None:
        """Dense update [N, K] fp32 for one module, or None if the adapter does not touch it."""
        ab = self.modules.get(prefix)
        if ab is None:
            return None
        gs = self.config.qalora_group_size if self.config.use_qalora else None
        return lora_delta(ab["A"], ab["B"], self.scaling(prefix), gs)


class MergedSource:
    """The merged model's fp32 weights, computed one tensor at a time: a TensorSource for the writers and
    for the quantization driver (`merge --to gptq`)."""

    def __init__(self, base_dir: Path, adapter: Adapter, device: str | torch.device = "cpu") -> None:
        self.src = SafetensorsSource(base_dir)
        self.qcfg = read_quant_config(base_dir)
        self.adapter, self.device = adapter, torch.device(device)
        self.quantized = {k[: -len(".qweight")] for k in self.src.keys() if k.endswith(".qweight")}
        plain = {k[: -len(".weight")] for k in self.src.keys() if k.endswith(".weight")}
        unknown = sorted(set(adapter.modules) - self.quantized - plain)
        if unknown:
            raise AdapterError(f"the adapter has weights for {unknown[:3]}, which the base {base_dir} does not "
                               f"have: an adapter for another base model")

    def keys(self) -> list[str]:
        out = []
        for k in self.src.keys():
            prefix, _, leaf = k.rpartition(".")
            if prefix in self.quantized and leaf in (*QUANT_TENSORS, "zeros"):
                if leaf == "qweight":
                    out.append(f"{prefix}.weight")
            else:
                out.append(k)
        return out

    def get(self, key: str, device: str | torch.device | None = None) -> torch.Tensor:
        device = device or self.device
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        if prefix in self.quantized:
            w = self.dense(prefix).t()  # (N, K)
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

    def packed(self, prefix: str):
        n = self.src.shape(f"{prefix}.scales")[1]
        bits = (self.qcfg.for_module(prefix) or {"bits": self.qcfg.bits})["bits"]
        k = self.src.shape(f"{prefix}.qweight")[0] * 32 // bits
        return read_packed(self.src, prefix, self.qcfg, k, n, self.device)

    def dense(self, prefix: str) -> torch.Tensor:
        """Dequantized base weight [K, N], fp32."""
        spec, t = self.packed(prefix)
        return dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], spec.bits, torch.float32)


def _plain_config(base_dir: Path, dtype: torch.dtype) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(base_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    return config


def _open_run(run_dir: str | Path) -> tuple[dict[str, Any], Path, Adapter]:
    info = read_run_info(run_dir)
    return info, base_path(run_dir, info), Adapter(adapter_path(run_dir))


def merge_to_fp16(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                  max_shard_size: str = "2GB", overwrite: bool = False, device: str = "cpu") -> Path:
    """A plain transformers model (base + adapter merged) that loads without gptqlora."""
    info, base, adapter = _open_run(run_dir)
    src = MergedSource(base, adapter, device)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        for key in tqdm(src.keys(), desc="merging", unit="tensor"):
            t = src.get(key, "cpu")
            writer.add(key, t.to(dtype) if t.is_floating_point() else t)
        writer.close()
        _plain_config(base, dtype).save_pretrained(tmp)
        copy_side_files(base, tmp)
        copy_side_files(run_dir, tmp)  # the run's tokenizer (pad token etc.) wins
    log.info("merged %s into %s", run_dir, out_dir)
    return Path(out_dir)


def merge_to_gptq(run_dir: str | Path, out_dir: str | Path, bits: int, group_size: int, desc_act: bool = False,
                  sym: bool = True, calibration: str | None = None, nsamples: int = 128, seqlen: int = 512,
                  device: str | None = None, overwrite: bool = False, max_shard_size: str = "2GB") -> dict:
    """Merge, then GPTQ-quantize into a standard checkpoint; calibrated on the run's training data unless
    `calibration` is given. Returns the quantization report (per-block error against the fp16 merge)."""
    from transformers import AutoTokenizer

    from gptqlora.data.calibration import calibration_from_data
    from gptqlora.data.templates import PromptTemplate
    from gptqlora.formats.gptq import FORMAT_V1, FORMAT_V2
    from gptqlora.quant.calibration import load_calibration
    from gptqlora.quant.driver import quantize_model

    info, base, adapter = _open_run(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    if calibration:
        samples = load_calibration(calibration, tokenizer, nsamples, seqlen)
    else:
        samples = calibration_from_data(info["data"], tokenizer, PromptTemplate.from_dict(info["template"]),
                                        nsamples, seqlen)
    qcfg = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                       format=FORMAT_V1 if sym else FORMAT_V2)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = quantize_model(run_dir, out_dir, qcfg, samples, device=dev, source=MergedSource(base, adapter, dev),
                            config=_plain_config(base, torch.float16), overwrite=overwrite,
                            max_shard_size=max_shard_size)
    return {"blocks": report.blocks, "worst_block_rel_error": max(b["rel_output_error"] for b in report.blocks)}


def merge_exact(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                max_shard_size: str = "2GB") -> Path:
    """Fold a QA-LoRA adapter into the zeros: W' = s·(q - z) + D = s·(q - (z - D/s)) with D constant per
    (group, output) — exact, no re-quantization. The zeros become floats (format gptq_v2_float_zeros),
    which gptqlora loads; other GPTQ loaders need integer zeros (use `--to gptq` for them)."""
    info, base, adapter = _open_run(run_dir)
    cfg = adapter.config
    if not cfg.use_qalora:
        raise AdapterError(f"{run_dir}: --exact needs an adapter trained with --use_qalora (this one is plain "
                           f"LoRA: use --to fp16 or --to gptq)")
    src = MergedSource(base, adapter)
    qcfg = src.qcfg
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        for key in tqdm(src.src.keys(), desc="merging exactly", unit="tensor"):
            prefix, _, leaf = key.rpartition(".")
            if prefix in src.quantized and prefix in adapter.modules and leaf in (*QUANT_TENSORS, "zeros"):
                if leaf == "qweight":
                    for k, v in _fold_into_zeros(src, prefix, adapter).items():
                        writer.add(k, v)
            else:
                writer.add(key, src.src.get(key))
        writer.close()
        qcfg.format = FORMAT_V2_FLOAT_ZEROS
        write_configs(tmp, json.loads((base / "config.json").read_text()) | {"quantization_config": None}, qcfg)
        copy_side_files(base, tmp)
        copy_side_files(run_dir, tmp)
    return Path(out_dir)


def _fold_into_zeros(src: MergedSource, prefix: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    spec, t = src.packed(prefix)
    gs = adapter.config.qalora_group_size
    if spec.group_size != gs or not torch.equal(t["g_idx"], spec.default_g_idx()):
        raise AdapterError(f"{prefix}: an exact merge needs the QA-LoRA group ({gs}) to equal the quantization "
                           f"group ({spec.group_size}) and no act-order; use --to gptq instead")
    delta = adapter.delta(prefix)  # (N, K), constant within each group of gs inputs
    d = delta.t()[::gs]  # (G, N)
    z = t["qzeros"].float() if t["qzeros"].is_floating_point() else unpack_cols(t["qzeros"], spec.bits).float()
    zeros = z - d / t["scales"].float()  # s·(q - z') = s·(q - z) + d
    return {f"{prefix}.qweight": t["qweight"], f"{prefix}.zeros": zeros, f"{prefix}.scales": t["scales"],
            f"{prefix}.g_idx": t["g_idx"]}
