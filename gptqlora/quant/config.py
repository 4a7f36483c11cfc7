"""`quantization_config`: what GPTQ checkpoints record about how they were quantized."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptqlora.formats.gptq import FORMAT_V1, FORMAT_V2, FORMATS, SUPPORTED_BITS

QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")  # searched before config.json


class QuantConfigError(ValueError):
    pass


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    format: str = FORMAT_V1  # checkpoint zero convention: "gptq" (v1) or "gptq_v2"
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    mse: bool = False
    lm_head: bool = False
    # GPTQModel-style per-module overrides: {regex: {bits, group_size, ...}}; a "-:" key prefix skips a module
    dynamic: dict | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(f"unsupported bits={self.bits}; gptqlora supports {SUPPORTED_BITS}")
        if self.group_size == 0 or self.group_size < -1:
            raise QuantConfigError(f"group_size must be -1 or positive, got {self.group_size}")
        if self.format not in FORMATS:
            raise QuantConfigError(f"unsupported checkpoint format {self.format!r}; supported: {FORMATS}")

    def to_dict(self) -> dict:
        """The dict written to config.json / quantize_config.json (both key spellings, as GPTQModel does)."""
        d = asdict(self)
        d.pop("mse")
        d.update(quant_method="gptq", checkpoint_format=self.format, damp_percent=self.damp_percent)
        d["meta"] = {"quantizer": ["gptqlora:0.1.0"], "mse": self.mse, **self.meta}
        if self.dynamic is None:
            d.pop("dynamic")
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "quantization_config") -> "QuantConfig":
        method = d.get("quant_method", d.get("method", "gptq"))
        if str(method).lower() != "gptq":
            raise QuantConfigError(f"{where}: quant_method {method!r} is not GPTQ")
        fmt = d.get("checkpoint_format", d.get("format", FORMAT_V1))
        try:
            return cls(bits=int(d["bits"]), group_size=int(d.get("group_size", -1)),
                       desc_act=bool(d.get("desc_act", False)), sym=bool(d.get("sym", True)), format=fmt,
                       static_groups=bool(d.get("static_groups", False)),
                       true_sequential=bool(d.get("true_sequential", True)),
                       damp_percent=float(d.get("damp_percent", 0.01)), lm_head=bool(d.get("lm_head", False)),
                       dynamic=d.get("dynamic"), meta=dict(d.get("meta") or {}))
        except KeyError as e:
            raise QuantConfigError(f"{where}: missing field {e}") from None
        except QuantConfigError as e:
            raise QuantConfigError(f"{where}: {e}") from None

    def for_module(self, name: str) -> dict | None:
        """bits/group_size/desc_act/sym for one module after `dynamic` overrides; None if it is skipped."""
        out = {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym}
        for pattern, override in (self.dynamic or {}).items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
            if re.match(regex, name):
                if negative:
                    return None
                out.update({k: v for k, v in (override or {}).items() if k in out})
        return out


def read_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """Find the quantization config the way AutoGPTQ/GPTQModel do; None if the model is not quantized."""
    model_dir = Path(model_dir)
    for name in QUANT_CONFIG_FILES:
        p = model_dir / name
        if p.is_file():
            return QuantConfig.from_dict(_read_json(p), where=str(p))
    p = model_dir / "config.json"
    if p.is_file():
        qc = _read_json(p).get("quantization_config")
        if qc is not None:
            return QuantConfig.from_dict(qc, where=f"{p} quantization_config")
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantConfigError(f"{path}: not valid JSON ({e})") from None


__all__ = ["QuantConfig", "QuantConfigError", "read_quant_config", "FORMAT_V1", "FORMAT_V2"]
