"""`quantization_config`: how a checkpoint was quantized, and the settings a quantization run uses.

The field defaults here are the quantization defaults of every entry point (`gptqlora quantize`,
`finetune --base_model`, `merge --to gptq`); the help texts are their command-line help.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from gptqlora.formats.base import FormatError
from gptqlora.formats.names import FORMAT_V1, FORMAT_V2, SUPPORTED_BITS

QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")  # searched before config.json
# --descent-passes when not given, per quant method: on for GPTQ, opt-in for SpQR (docs/results.md, section 3,
# session 18: on man-page v2 it narrowed SpQR's gap in some seed/text pairs and widened it in others)
DESCENT_PASSES = {"spqr": 0}
DEFAULT_DESCENT_PASSES = 3


class QuantConfigError(ValueError):
    pass


def _formats():
    """The format registry. It binds formats to their layers (gptqlora.nn, torch), so it is imported when a
    config is checked or read, not with this module: `gptqlora COMMAND --help` shows the fields only."""
    from gptqlora.nn.registry import FORMATS

    return FORMATS


@dataclass
class QuantConfig:
    """How the weights are quantized and stored (what the checkpoint's quantization_config records)."""

    bits: int = field(default=4, metadata={"help": "bits per weight", "choices": SUPPORTED_BITS})
    group_size: int = field(default=128, metadata={"min": 1, "also": (-1,),
        "help": "input channels per quantization group; -1 = one group per output channel"})
    desc_act: bool = field(default=False, metadata={
        "help": "act-order: quantize columns by decreasing Hessian diagonal (better at low bits)"})
    sym: bool = field(default=True, metadata={
        "help": "symmetric quantization, what vLLM's fast GPTQ path needs (--asym: with zero points)",
        "negative": ("asym",)})
    format: Optional[str] = field(default=None, metadata={
        "help": "zero-point convention on disk: gptq (v1, read by every GPTQ loader; the default with --sym) "
                "or gptq_v2 (true zeros; the default with --asym, since v1 cannot store a zero of 0)",
        "choices": (FORMAT_V1, FORMAT_V2)})
    static_groups: bool = field(default=False, metadata={
        "help": "compute group parameters before the GPTQ updates (keeps g_idx trivial with --desc-act)"})
    true_sequential: bool = field(default=True, metadata={
        "help": "quantize a block's linears in the order qkv -> o -> gate/up -> down, each group seeing the "
                "previous ones quantized (--no-true-sequential: all at once)"})
    # damp .05, mse, GAR and GPTAQ (alpha 1) by default: measured against GPTQModel 7.7 in
    # bench/quantizer_compare.py over three calibration seeds (docs/results.md, with their cost in time)
    damp_percent: float = field(default=0.05, metadata={
        "help": "Hessian dampening as a fraction of its mean diagonal; raised automatically if Cholesky fails",
        "aliases": ("damp",)})
    mse: bool = field(default=True, metadata={
        "help": "search clipped ranges that minimise the weight error (--no-mse: the plain min/max range)"})
    mse_select: bool = field(default=False, metadata={
        "help": "with --mse: quantize each linear with and without the range search and keep the one with the "
                "lower calibration output error ||X (W - Q)||^2 (a second GPTQ pass per linear)"})
    gptaq: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0,
        "help": "asymmetric calibration (GPTAQ) strength alpha in [0, 1]: each linear's target is the fp "
                "model's output on fp inputs (1, the default) instead of its own fp weights on the quantized "
                "model's inputs (0: plain GPTQ); costs an fp copy of one block and of the block inputs"})
    refit_scales: bool = field(default=True, metadata={
        "help": "after GPTQ, refit each group's scales to the chosen codes by least squares on the calibration "
                "output error (codes, zeros and the format unchanged; one extra pass like W H per linear). On by "
                "default since session 16: over three models and three seeds it lowered the perplexity gap in most "
                "configurations and halved it at 3 bit on the tiny model (docs/results.md); --no-refit-scales "
                "gives the previous default"})
    refit_rounds: int = field(default=0, metadata={"min": 0,
        "help": "with --refit-scales: rounds of re-choosing the codes by GPTQ with the refitted scales held fixed, "
                "then refitting again; a round is kept only if it lowers the calibration output error (one GPTQ "
                "pass and one refit per round per linear)"})
    descent_passes: Optional[int] = field(default=None, metadata={"min": 0,
        "help": "passes of coordinate descent on the codes after GPTQ (scales fixed, each code re-chosen to lower "
                "the calibration output error under GPTQ's damped Hessian, given all others), each followed by the "
                "scale refit where on (N K^2 per pass per linear, plus the refit's). 3 by default: over three models "
                "and three seeds it narrowed the 2-bit gaps (tiny 0.70x, man-page v2 0.93x) and left the 3-4 bit "
                "ones within the noise (docs/results.md, 'Coordinate descent on the codes'); 0 gives the previous "
                "default. --method spqr: the same descent on its codes (its 3-bit statistics fixed, each fp16 "
                "outlier at its exact optimum), opt-in (default 0 there): on man-page v2 it narrowed the gap to fp16 "
                "in some seeds and texts and widened it in others (docs/results.md, section 3, session 18)"})
    act_group_aware: bool = field(default=True, metadata={
        "help": "without --desc-act: group-aware reordering (GAR), groups quantized in decreasing order of "
                "their largest Hessian diagonal, g_idx kept trivial so every loader reads it "
                "(--no-act-group-aware: columns in their own order)"})
    stat_bits: int = field(default=3, metadata={
        "help": "--method spqr: bits of the second-level quantization of the group scales and zeros"})
    stat_group_size: int = field(default=16, metadata={
        "help": "--method spqr: output channels sharing one second-level scale/zero of the group statistics"})
    # Per-module precision rules, GPTQModel's `dynamic` (see `precision_rules`): {regex: {bits, group_size,
    # desc_act, sym}}, ordered, the first rule whose regex matches a module's full name (re.match) decides it;
    # a "-:" key prefix keeps the module in full precision, "+:" (or none) overrides its settings.
    dynamic: Optional[dict] = field(default=None, metadata={"cli": False})
    meta: dict = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.format is None:
            self.format = FORMAT_V1 if self.sym else FORMAT_V2
        if self.group_size == 0 or self.group_size < -1:
            raise QuantConfigError(f"group_size must be -1 or positive, got {self.group_size}")
        try:
            _formats().lookup(None, self.format).format.check_bits(self.bits)
        except FormatError as e:
            raise QuantConfigError(str(e)) from None
        if self.dynamic is not None:
            self.dynamic = check_dynamic(self.dynamic, self.format)

    @property
    def descent(self) -> int:
        """`descent_passes`, or where not given the default of this config's method."""
        if self.descent_passes is not None:
            return self.descent_passes
        return DESCENT_PASSES.get(self.method, DEFAULT_DESCENT_PASSES)

    @property
    def method(self) -> str:
        """The `quant_method` of this config's format."""
        return _formats().lookup(None, self.format).format.method

    def to_dict(self) -> dict:
        """The dict written to config.json / quantize_config.json (both key spellings, as GPTQModel does)."""
        d = asdict(self)
        for k in ("mse", "mse_select", "gptaq", "act_group_aware", "refit_scales", "refit_rounds",
                  "descent_passes"):
            d.pop(k)  # how the codes were found, not how to read them: meta, as GPTQModel does
        d.update(quant_method=self.method, checkpoint_format=self.format)
        # only what the method's solver used: SpQR takes neither GAR, the scale refit nor mse_select; GAR applies
        # only without act-order (and GPTQModel refuses a config that says both)
        gptq_only = {"act_group_aware": self.act_group_aware and not self.desc_act, "mse_select": self.mse_select,
                     "refit_scales": self.refit_scales, "refit_rounds": self.refit_rounds}
        d["meta"] = {"quantizer": ["gptqlora:0.1.0"], "mse": self.mse,
                     **(gptq_only if self.method != "spqr" else {}), "descent_passes": self.descent,
                     # GPTQModel reads meta's "gptaq" as its GPTAQConfig: a dict or None, not a number
                     "gptaq": {"alpha": self.gptaq} if self.gptaq else None, **self.meta}
        if self.dynamic is None:
            d.pop("dynamic")
        if self.method != "spqr":  # second-level statistics exist in SpQR layers only
            d.pop("stat_bits"), d.pop("stat_group_size")
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "quantization_config") -> "QuantConfig":
        method = d.get("quant_method", d.get("method", "gptq"))
        try:
            fmt = _formats().lookup(method, d.get("checkpoint_format", d.get("format"))).format.name
            return cls(bits=int(d["bits"]), group_size=int(d.get("group_size", -1)),
                       desc_act=bool(d.get("desc_act", False)), sym=bool(d.get("sym", True)), format=fmt,
                       static_groups=bool(d.get("static_groups", False)),
                       true_sequential=bool(d.get("true_sequential", True)),
                       damp_percent=float(d.get("damp_percent", 0.01)),
                       stat_bits=int(d.get("stat_bits", 3)), stat_group_size=int(d.get("stat_group_size", 16)),
                       dynamic=d.get("dynamic"), meta=dict(d.get("meta") or {}))
        except KeyError as e:
            raise QuantConfigError(f"{where}: missing field {e}") from None
        except (QuantConfigError, FormatError) as e:
            raise QuantConfigError(f"{where}: {e}") from None

    def for_module(self, name: str) -> dict | None:
        """bits/group_size/desc_act/sym for one module after the `dynamic` rules; None if it stays in full
        precision. As in GPTQModel: the first rule whose regex matches the full module name decides."""
        out = {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym}
        rule = matching_rule(self.dynamic, name)
        if rule is None:
            return out
        if rule.startswith("-:"):
            return None
        out.update({k: v for k, v in (self.dynamic[rule] or {}).items() if k in out})
        return out


RULE_KEYS = ("bits", "group_size", "desc_act", "sym")  # what a rule may set (GPTQModel's engine-visible fields)


def rule_regex(pattern: str) -> str:
    """A `dynamic` key without its "-:"/"+:" prefix."""
    return pattern[2:] if pattern[:2] in ("-:", "+:") else pattern


def matching_rule(dynamic: dict | None, name: str) -> str | None:
    """The first `dynamic` key whose regex matches `name` from its start (GPTQModel's order), or None."""
    for pattern in dynamic or {}:
        if re.match(rule_regex(pattern), name):
            return pattern
    return None


def check_dynamic(dynamic: dict, fmt: str) -> dict:
    """Validate `dynamic` rules (regexes compile, known keys, storable bits/group sizes); returns them."""
    if not isinstance(dynamic, dict):
        raise QuantConfigError(f"dynamic must be a mapping of regex -> settings, got {type(dynamic).__name__}")
    for pattern, override in dynamic.items():
        try:
            re.compile(rule_regex(pattern))
        except re.error as e:
            raise QuantConfigError(f"precision rule {pattern!r}: not a valid regex ({e})") from None
        override = override or {}
        if not isinstance(override, dict):
            raise QuantConfigError(f"precision rule {pattern!r}: settings must be a mapping, got {override!r}")
        unknown = sorted(set(override) - set(RULE_KEYS))
        if unknown:
            raise QuantConfigError(f"precision rule {pattern!r}: unknown setting(s) {unknown}; a rule sets "
                                   f"{', '.join(RULE_KEYS)}")
        if pattern.startswith("-:") and override:
            raise QuantConfigError(f"precision rule {pattern!r} keeps modules in full precision, so it takes no "
                                   f"settings (got {override})")
        if "bits" in override:
            try:
                _formats().lookup(None, fmt).format.check_bits(int(override["bits"]))
            except (FormatError, TypeError, ValueError) as e:
                raise QuantConfigError(f"precision rule {pattern!r}: {e}") from None
        gs = override.get("group_size", -1)
        if not isinstance(gs, int) or gs == 0 or gs < -1:
            raise QuantConfigError(f"precision rule {pattern!r}: group_size must be -1 or positive, got {gs!r}")
    return dict(dynamic)


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


__all__ = ["QuantConfig", "QuantConfigError", "read_quant_config", "matching_rule", "rule_regex", "check_dynamic"]
