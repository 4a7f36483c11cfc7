"""GPTQ checkpoints: load any v1/v2 GPTQ checkpoint (AutoGPTQ, GPTQModel, ours) and save ours.

    model = gptqlora.load_quantized("llama-7b-2bit", device="cuda")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from gptqlora.formats.gptq import (FORMAT_V1, FormatError, GPTQSpec, zeros_v1_to_v2, zeros_v2_to_v1)
from gptqlora.nn.quant_linear import QuantLinear
from gptqlora.quant.config import QuantConfig, read_quant_config
from gptqlora.quant.io import CheckpointError, SafetensorsSource, ShardedWriter, atomic_output_dir
from gptqlora.quant.model_utils import build_empty_model

log = logging.getLogger(__name__)

QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_quantized(path: str | Path, device: str | torch.device | None = None,
                   dtype: torch.dtype = torch.float16) -> PreTrainedModel:
    """Load a GPTQ checkpoint as a transformers model whose quantized linears are QuantLinear.

    Zero points are converted to v2 in memory. Non-quantized parts (embeddings, norms, lm_head) load in
    `dtype`. Raises CheckpointError naming the file and problem for corrupt or mismatched checkpoints.
    """
    path = Path(path)
    device = _resolve_device(device)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; not a model directory")
    qcfg = read_quant_config(path)
    if qcfg is None:
        raise CheckpointError(f"{path}: no quantization_config (config.json or quantize_config.json), so this "
                              f"is not a GPTQ checkpoint; quantize it first with `gptqlora quantize`")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the layers ourselves; keep transformers' quantizer out
    src = SafetensorsSource(path)
    model = build_empty_model(config, dtype)

    state: dict[str, torch.Tensor] = {}
    quantized = sorted(k[: -len(".qweight")] for k in src.keys() if k.endswith(".qweight"))
    if not quantized:
        raise CheckpointError(f"{path}: quantization_config says GPTQ but no '*.qweight' tensors were found")
    for prefix in quantized:
        state.update(_load_quant_module(model, src, prefix, qcfg, device, dtype))
    taken = {f"{p}.{t}" for p in quantized for t in (*QUANT_TENSORS, "zeros", "bias")}
    expected = set(model.state_dict())
    for key in src.keys():
        if key in taken:
            continue
        if key not in expected:
            log.warning("%s: ignoring tensor '%s', which the model does not have", path, key)
            continue
        t = src.get(key, device)
        state[key] = t.to(dtype) if t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks weights for {len(missing)} parameter(s), e.g. "
                              f"{missing[:3]}; it does not match its config.json")
    model.to(device)
    model.gptq_config = qcfg
    model.config.name_or_path = str(path)
    return model


def read_packed(src: SafetensorsSource, prefix: str, qcfg: QuantConfig, in_features: int, out_features: int,
                device: str | torch.device = "cpu") -> tuple[GPTQSpec, dict[str, torch.Tensor]]:
    """One quantized layer's tensors, validated against its spec, zeros as v2 (or float, if so stored)."""
    where = f"{src.key_to_file[prefix + '.qweight']}: {prefix}: "
    mcfg = qcfg.for_module(prefix) or {"bits": qcfg.bits, "group_size": qcfg.group_size}
    float_zeros = f"{prefix}.zeros" in src
    try:
        spec = GPTQSpec(in_features, out_features, mcfg["bits"], mcfg["group_size"])
        names = (*QUANT_TENSORS, "zeros") if float_zeros else QUANT_TENSORS
        tensors = {t: src.get(f"{prefix}.{t}", device) for t in names if f"{prefix}.{t}" in src}
        if float_zeros:
            tensors["qzeros"] = tensors.pop("zeros").float()
            if tuple(tensors["qzeros"].shape) != (spec.n_groups, out_features):
                raise FormatError(f"{where}'zeros' has shape {tuple(tensors['qzeros'].shape)}, expected "
                                  f"{(spec.n_groups, out_features)}")
        else:
            spec.check(tensors, where)
    except FormatError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(where) else where + msg) from None
    if qcfg.format == FORMAT_V1 and not float_zeros:  # (float zeros are always true zeros)
        tensors["qzeros"], wrapped = zeros_v1_to_v2(tensors["qzeros"], spec.bits)
        if wrapped:
            log.warning("%s%d v1 zero field(s) hold -1 (true zero 0, the v1 overflow); read as 0", where, wrapped)
    tensors["scales"] = tensors["scales"].to(torch.float16)
    tensors["g_idx"] = tensors.get("g_idx", spec.default_g_idx().to(device)).to(torch.int32)
    return spec, tensors


def _load_quant_module(model: nn.Module, src: SafetensorsSource, prefix: str, qcfg: QuantConfig,
                       device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    try:
        linear = model.get_submodule(prefix)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{src.key_to_file[prefix + '.qweight']}: {prefix}: the checkpoint has a quantized "
                              f"layer here but a {model.config.model_type} model built from its config.json has "
                              f"no linear layer of that name")
    spec, tensors = read_packed(src, prefix, qcfg, linear.in_features, linear.out_features, device)
    has_bias = f"{prefix}.bias" in src
    layer = QuantLinear(spec.in_features, spec.out_features, spec.bits, spec.group_size, bias=has_bias,
                        device="meta", dtype=dtype, float_zeros=tensors["qzeros"].is_floating_point())
    model.set_submodule(prefix, layer)
    out = {f"{prefix}.{k}": v for k, v in tensors.items()}
    if layer.float_zeros:
        out[f"{prefix}.zeros"] = out.pop(f"{prefix}.qzeros")
    if has_bias:
        out[f"{prefix}.bias"] = src.get(f"{prefix}.bias", device).to(dtype)
    return out


def packed_state(prefix: str, layer: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    """A QuantLinear's tensors as stored in a checkpoint of format `fmt` (v1 zeros converted)."""
    if layer.float_zeros:  # exact QA-LoRA merge: float zeros, readable by gptqlora only
        zeros = {f"{prefix}.zeros": layer.zeros.float()}
    elif fmt == FORMAT_V1:
        zeros = {f"{prefix}.qzeros": zeros_v2_to_v1(layer.qzeros, layer.bits, where=f"{prefix}: ")}
    else:
        zeros = {f"{prefix}.qzeros": layer.qzeros}
    out = {f"{prefix}.qweight": layer.qweight, **zeros,
           f"{prefix}.scales": layer.scales.to(torch.float16), f"{prefix}.g_idx": layer.g_idx.to(torch.int32)}
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.to(torch.float16)
    return out


def write_configs(out_dir: Path, config_dict: dict, qcfg: QuantConfig) -> None:
    """config.json with quantization_config (what transformers reads) and quantize_config.json (GPTQ tools)."""
    config_dict = dict(config_dict)
    config_dict["quantization_config"] = qcfg.to_dict()
    config_dict.pop("dtype", None)
    config_dict["torch_dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg.to_dict(), indent=2))


def save_quantized(model: PreTrainedModel, out_dir: str | Path, qcfg: QuantConfig | None = None,
                   max_shard_size: int | str = "2GB", overwrite: bool = False) -> Path:
    """Save a model holding QuantLinear layers as a standard GPTQ checkpoint (atomically)."""
    qcfg = qcfg or getattr(model, "gptq_config", None)
    if qcfg is None:
        raise ValueError("save_quantized needs a QuantConfig (the model has no `gptq_config`)")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        skip = {f"{n}.{t}" for n in quant for t in (*QUANT_TENSORS, "zeros", "bias")}
        for name, layer in quant.items():
            for k, v in packed_state(name, layer, qcfg.format).items():
                writer.add(k, v)
        tied = _tied_keys(model)
        for k, v in model.state_dict().items():
            if k not in skip and k not in tied:
                writer.add(k, v.to(torch.float16) if v.is_floating_point() else v)
        writer.close()
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        write_configs(tmp, cfg, qcfg)
    return Path(out_dir)


def _tied_keys(model: PreTrainedModel) -> set[str]:
    """State-dict keys that share storage with an earlier key (tied lm_head), so written once."""
    seen, tied = {}, set()
    for k, v in model.state_dict().items():
        ptr = (v.data_ptr(), v.shape) if v.numel() else None
        if ptr is not None and ptr in seen:
            tied.add(k)
        elif ptr is not None:
            seen[ptr] = k
    return tied
