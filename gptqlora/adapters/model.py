"""Wrap a quantized model with GPTQ-LoRA adapters, or load saved ones.

    model = gptqlora.load_quantized("llama-7b-4bit")
    peft_model = gptqlora.get_peft_model(model, GPTQLoraConfig(r=8))
    ...
    peft_model.save_pretrained("adapter/")                 # standard PEFT LoRA files
    peft_model = gptqlora.load_adapter(model, "adapter/")
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Sequence

import peft
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from torch import nn

from gptqlora.adapters.config import CALIBRATED_INITS, SETTINGS_FILE, GPTQLoraConfig
from gptqlora.adapters.dispatch import register
from gptqlora.adapters.siblings import link_siblings
from gptqlora.nn.registry import FORMATS

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter (or its config) that does not fit the model it is used with."""


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    names, wrapped = [], ()
    for n, m in model.named_modules():
        if wrapped and n.startswith(wrapped):
            continue  # inside a LoRA layer: its base_layer and lora_A/lora_B are not targets
        if isinstance(m, LoraLayer):
            names.append(n)
            wrapped = wrapped + (n + ".",)
        elif isinstance(m, nn.Linear) or FORMATS.is_packed(m):
            names.append(n)
    hit = [n for n in names if _matches(n, config.target_modules)]
    if not hit:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise AdapterError(f"target_modules {config.target_modules} match no layer of this model; "
                           f"its linear layers are named {leaves}")
    if isinstance(config.target_modules, (list, set)):
        missing = [t for t in config.target_modules if not any(_matches(n, [t]) for n in hit)]
        if missing:
            raise AdapterError(f"target_modules {missing} match no layer of this model")
    for n in hit:
        m = model.get_submodule(n)
        limit = min(m.in_features, m.out_features)
        r = config.rank_pattern.get(n.rsplit(".", 1)[-1], config.r) if config.rank_pattern else config.r
        if r > limit:
            raise AdapterError(f"LoRA rank r={r} is larger than layer {n} allows ({m.out_features}x"
                               f"{m.in_features}: at most {limit})")
    return hit


def get_peft_model(model: nn.Module, config: GPTQLoraConfig | LoraConfig | None = None,
                   adapter_name: str = "default", calibration: Sequence[torch.Tensor] | None = None) -> PeftModel:
    """Wrap every target QuantLinear (and plain Linear) of `model` with trainable LoRA adapters.

    Only `lora_*` parameters require grad; the packed base stays frozen. `calibration` (token ids [1, L]
    each) is what init_method='aware' weights the residual by.
    """
    init = getattr(config, "init_method", "default")
    if init in CALIBRATED_INITS and not calibration:
        raise ValueError(f"init_method={init!r} needs calibration samples (token ids) to weight the residual by")
    config = config if config is not None else GPTQLoraConfig()
    _check_targets(model, config)
    quant_groups = {m.group_size for m in model.modules() if FORMATS.is_packed(m) and hasattr(m, "group_size")}
    if config.use_qalora and quant_groups and quant_groups != {config.qalora_group_size}:
        log.warning("QA-LoRA group size %d differs from the base's quantization group size %s: training "
                    "works, but the adapter cannot be merged exactly into the zeros", config.qalora_group_size,
                    sorted(quant_groups))
    peft_model = peft.get_peft_model(model, register(config), adapter_name=adapter_name,
                                     autocast_adapter_dtype=_keep_fp32(config))
    if init == "svd":
        from gptqlora.adapters.init import svd_init

        svd_init(peft_model, config, adapter_name)
    elif init in CALIBRATED_INITS:
        from gptqlora.adapters.aware import aware_init, output_init
        from gptqlora.checkpoint.io import SafetensorsSource

        src = SafetensorsSource(config.svd_source)
        if init == "aware":
            aware_init(peft_model, src, calibration, adapter_name)
        else:
            output_init(peft_model, src, calibration, adapter_name)
    link_siblings(peft_model)
    return peft_model


def read_adapter_config(adapter_dir: str | Path) -> GPTQLoraConfig | LoraConfig:
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: no such adapter folder" if not adapter_dir.exists() else
                           f"{adapter_dir}: is a file; give the adapter's folder (with {ADAPTER_CONFIG})")
    if not cfg_path.is_file():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        bins = [p.name for p in adapter_dir.glob("adapter_model.bin")]
        hint = " (only a pickled adapter_model.bin, which gptqlora does not load)" if bins else ""
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; gptqlora loads LORA adapters")
    _check_weights_file(adapter_dir / ADAPTER_WEIGHTS)
    settings = adapter_dir / SETTINGS_FILE
    if settings.is_file():  # our own settings, beside the standard file
        try:
            raw = {**raw, **json.loads(settings.read_text())}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{settings}: not valid JSON ({e})") from None
    known = GPTQLoraConfig.__dataclass_fields__
    cls = GPTQLoraConfig if {"lora_dtype", "init_method"} & raw.keys() else LoraConfig
    kwargs = {k: v for k, v in raw.items() if k in known}
    if cls is GPTQLoraConfig:
        kwargs["init_method"] = "default"  # an init already happened; loading must not redo it
    return cls(**kwargs)


def _check_weights_file(path: Path) -> None:
    """A truncated or corrupt adapter_model.safetensors fails here, naming the file (safetensors checks the
    header and that the file is as long as the header says)."""
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({e}); re-create the adapter (e.g. "
                           f"resume the run: its checkpoints hold copies)") from None


LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """'base_model.model.X.lora_A.weight' -> ('X', 'A'); None for keys that are not LoRA weights."""
    m = LORA_KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


def _check_adapter_shapes(model: nn.Module, adapter_dir: Path, config: LoraConfig) -> None:
    """Compare the saved lora_A/lora_B shapes with the model's layers before PEFT sees them."""
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, framework="pt") as f:
        for key in f.keys():
            parsed = parse_lora_key(key)
            if parsed is None:
                continue
            name, which = parsed
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise AdapterError(f"{adapter_dir}: the adapter has weights for '{name}', which this model "
                                   f"does not have (adapter for another base model?)") from None
            layer = getattr(layer, "base_layer", layer)
            shape = tuple(f.get_slice(key).get_shape())
            if which == "B" and shape[0] != layer.out_features or which == "A" and not config.use_qalora \
                    and shape[1] != layer.in_features:
                raise AdapterError(f"{adapter_dir}: '{key}' has shape {shape}, but {name} here is "
                                   f"{layer.out_features}x{layer.in_features}: the adapter was trained for "
                                   f"another base model")


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """Load a saved LoRA adapter onto a quantized (or plain) model; adds it if `model` is a PeftModel."""
    adapter_dir = Path(adapter_dir)
    config = register(read_adapter_config(adapter_dir))
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    _check_targets(base, config)
    _check_adapter_shapes(base, adapter_dir, config)
    config.inference_mode = not is_trainable
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable,
                           peft_config=config, autocast_adapter_dtype=_keep_fp32(config))
        link_siblings(model)
        return model
    model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name,
                                      is_trainable=is_trainable, config=config,
                                      autocast_adapter_dtype=_keep_fp32(config))
    link_siblings(model)
    return model


def _keep_fp32(config: LoraConfig) -> bool:
    """PEFT upcasts half-precision adapters to fp32 unless told not to; honour lora_dtype='bfloat16'."""
    return getattr(config, "lora_dtype", "float32") == "float32"
