"""Packed checkpoints: load any checkpoint in a registered format (GPTQ v1/v2 from AutoGPTQ, GPTQModel or
ours), and save ours. What a format stores is the registry's business (`gptqlora.nn.registry`).

    model = gptqlora.load_quantized("llama-7b-2bit", device="cuda")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from gptqlora.checkpoint.config import QuantConfig, read_quant_config
from gptqlora.checkpoint.io import CheckpointError, SafetensorsSource, ShardedWriter, atomic_output_dir
from gptqlora.devices import resolve_device
from gptqlora.formats.base import FormatError, PackedFormat
from gptqlora.nn.registry import FORMATS

log = logging.getLogger(__name__)


def build_empty_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model skeleton with parameters on the meta device (no memory); buffers are real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_quantized(path: str | Path, device: str | torch.device | None = None,
                   dtype: torch.dtype = torch.float16) -> PreTrainedModel:
    """Load a packed checkpoint as a transformers model whose packed linears are the format's layers
    (QuantLinear for GPTQ, zero points as v2 in memory).

    Non-quantized parts (embeddings, norms, lm_head) load in `dtype`. Raises CheckpointError naming the
    file and problem for corrupt or mismatched checkpoints.
    """
    path = Path(path)
    device = resolve_device(device)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; not a model directory")
    qcfg = read_quant_config(path)
    if qcfg is None:
        raise CheckpointError(f"{path}: no quantization_config (config.json or quantize_config.json), so this "
                              f"is not a GPTQ checkpoint; quantize it first with `gptqlora quantize`")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the layers ourselves; keep transformers' quantizer out
    fmt = FORMATS.lookup(qcfg.method, qcfg.format).format
    src = SafetensorsSource(path)
    model = build_empty_model(config, dtype)

    prefixes = fmt.layer_prefixes(src.keys())
    if not prefixes:
        raise CheckpointError(f"{path}: quantization_config says {qcfg.method} ({qcfg.format}) but no "
                              f"'*.{fmt.marker}' tensors were found")
    for prefix in prefixes:
        linear = _linear_at(model, src, prefix, fmt)
        model.set_submodule(prefix, read_layer(src, prefix, qcfg, linear.in_features, linear.out_features,
                                               device, dtype))
    packed = frozenset(prefixes)
    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for key in src.keys():
        if fmt.owns(key, packed) or (key.endswith(".bias") and key[: -len(".bias")] in packed):
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


def _linear_at(model: nn.Module, src: SafetensorsSource, prefix: str, fmt: PackedFormat) -> nn.Linear:
    try:
        linear = model.get_submodule(prefix)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{src.key_to_file[f'{prefix}.{fmt.marker}']}: {prefix}: the checkpoint has a "
                              f"quantized layer here but a {model.config.model_type} model built from its "
                              f"config.json has no linear layer of that name")
    return linear


def read_layer(src: SafetensorsSource, prefix: str, qcfg: QuantConfig, in_features: int | None = None,
               out_features: int | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float16) -> nn.Module:
    """One packed layer, validated against its shape (from the model, else from the file headers)."""
    entry = FORMATS.lookup(qcfg.method, qcfg.format)
    fmt = entry.format
    where = f"{src.key_to_file[f'{prefix}.{fmt.marker}']}: {prefix}: "
    mcfg = qcfg.for_module(prefix) or {"bits": qcfg.bits, "group_size": qcfg.group_size}
    names = [n for n in fmt.stored if f"{prefix}.{n}" in src]
    try:
        if in_features is None or out_features is None:
            shapes = {n: src.shape(f"{prefix}.{n}") for n in names}
            in_features, out_features = fmt.shape_from_headers(shapes, mcfg["bits"])
        spec = fmt.spec(in_features, out_features, mcfg["bits"], mcfg["group_size"])
        buffers = fmt.read({n: src.get(f"{prefix}.{n}", device) for n in names}, spec, where)
    except FormatError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(where) else where + msg) from None
    bias = src.get(f"{prefix}.bias", device).to(dtype) if f"{prefix}.bias" in src else None
    return entry.layer.from_packed(spec, buffers, bias)


def layer_tensors(prefix: str, layer: nn.Module, fmt: PackedFormat) -> dict[str, torch.Tensor]:
    """A packed layer's tensors as stored in format `fmt`, by checkpoint key."""
    out = {f"{prefix}.{k}": v for k, v in fmt.write(layer.packed_state(), layer.spec, f"{prefix}: ").items()}
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.to(torch.float16)
    return out


def write_configs(out_dir: Path, config_dict: dict, qcfg: QuantConfig) -> None:
    """config.json with quantization_config (what transformers reads) and quantize_config.json (GPTQ tools)."""
    config_dict = dict(config_dict)
    config_dict["quantization_config"] = qcfg.to_dict()
    config_dict.pop("dtype", None)
    config_dict["torch_dtype"] = "float16"
    # top-level keys sorted, nested ones kept in order: `dynamic` rules are ordered (the first match decides)
    (out_dir / "config.json").write_text(json.dumps(dict(sorted(config_dict.items())), indent=2))
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg.to_dict(), indent=2))


def save_quantized(model: PreTrainedModel, out_dir: str | Path, qcfg: QuantConfig | None = None,
                   max_shard_size: int | str = "2GB", overwrite: bool = False, checked: bool = False) -> Path:
    """Save a model holding packed layers as a checkpoint in `qcfg.format` (atomically; `checked`: the
    caller owns the folder, e.g. a run's own base)."""
    qcfg = qcfg or getattr(model, "gptq_config", None)
    if qcfg is None:
        raise ValueError("save_quantized needs a QuantConfig (the model has no `gptq_config`)")
    entry = FORMATS.lookup(qcfg.method, qcfg.format)
    packed = {n: m for n, m in model.named_modules() if FORMATS.is_packed(m)}
    for name, layer in packed.items():
        if not isinstance(layer, entry.layer):
            raise ValueError(f"{name}: a {type(layer).__name__} cannot be stored in format {qcfg.format}")
    with atomic_output_dir(out_dir, overwrite, checked=checked) as tmp:
        writer = ShardedWriter(tmp, max_shard_size)
        for name, layer in packed.items():
            for k, v in layer_tensors(name, layer, entry.format).items():
                writer.add(k, v)
        tied = _tied_keys(model)
        for k, v in model.state_dict().items():
            if k.rpartition(".")[0] not in packed and k not in tied:
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
