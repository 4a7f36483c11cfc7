"""Per-module precision: `--keep` presets and `--rule` texts -> the ordered `dynamic` rules of a QuantConfig.

    --keep ffn        gate/up/down_proj stay fp16 (the research's 2-bit MMLU fix)
    --keep attn       q/k/v/o_proj stay fp16
    --keep crucial    every down_proj, plus the two attention projections (by type, in every block) with
                      the largest GPTQ error, measured at the target bits or read from --crucial-from
    --keep REGEX      modules whose full name matches REGEX (re.match) stay fp16
    --rule 'REGEX=bits:8,group_size:32'   or   --rule 'REGEX=skip'

Rules are stored as GPTQModel's `dynamic` (first match decides; "-:" = full precision), so GPTQModel reads
the per-module settings of our checkpoints. `check_rules` refuses a rule that matches no module and a rule
that never decides anything because earlier rules decide all its modules differently (a conflict).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from gptqlora.checkpoint.checkpoint import build_empty_model
from gptqlora.checkpoint.config import RULE_KEYS, QuantConfigError, check_dynamic, matching_rule, rule_regex
from gptqlora.quant.model_utils import decoder_layers

log = logging.getLogger(__name__)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
PRESETS = {
    "ffn": r"-:.*\.mlp\.(gate_proj|up_proj|down_proj)$",
    "attn": r"-:.*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
}


def _type_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def crucial_types(errors: Mapping[str, float], n_attn: int = 2) -> list[str]:
    """The attention projection types (q/k/v/o_proj) with the largest summed GPTQ error over the blocks."""
    total: dict[str, float] = {}
    for name, err in errors.items():
        if _type_of(name) in ATTN:
            total[_type_of(name)] = total.get(_type_of(name), 0.0) + float(err)
    if len(total) < n_attn:
        raise QuantConfigError(f"--keep crucial needs the GPTQ error of at least {n_attn} attention projection "
                               f"types; the measurement has {sorted(total) or 'none'}")
    return sorted(total, key=lambda t: -total[t])[:n_attn]


def crucial_pattern(errors: Mapping[str, float]) -> str:
    kept = ["down_proj", *crucial_types(errors)]
    return r"-:.*\.(" + "|".join(kept) + r")$"


def read_errors(path: str | Path) -> dict[str, float]:
    """Per-module GPTQ errors from a quant_report.json (`modules`) or a `gptqlora analyze` analysis.json
    (`gptq_error` at the first measured bits; `bits` in its header picks the column)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise QuantConfigError(f"--crucial-from {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantConfigError(f"--crucial-from {path}: not valid JSON ({e})") from None
    if isinstance(data.get("modules"), dict):  # a quant report
        return {n: float(m["error"]) for n, m in data["modules"].items() if "error" in m}
    if isinstance(data.get("gptq_error"), dict):  # an analysis: {bits: {module: error}}
        by_bits = data["gptq_error"]
        bits = str(data.get("target_bits", next(iter(by_bits), "")))
        return {n: float(e) for n, e in by_bits.get(bits, {}).items()}
    raise QuantConfigError(f"--crucial-from {path}: neither a quant_report.json (with 'modules') nor a "
                           f"`gptqlora analyze` analysis.json (with 'gptq_error')")


def parse_rule(text: str) -> tuple[str, dict]:
    """'REGEX=skip' -> ('-:REGEX', {}); 'REGEX=bits:8,group_size:32' -> ('+:REGEX', {...})."""
    regex, sep, settings = text.rpartition("=")
    if not sep or not regex:
        raise QuantConfigError(f"--rule {text!r}: write REGEX=skip or REGEX=bits:B[,group_size:G,sym:BOOL,"
                               f"desc_act:BOOL]")
    if settings.strip().lower() in ("skip", "fp16", "keep"):
        return f"-:{regex}", {}
    out: dict = {}
    for item in settings.split(","):
        key, sep, value = item.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or key not in RULE_KEYS:
            raise QuantConfigError(f"--rule {text!r}: '{item}' is not KEY:VALUE with KEY one of "
                                   f"{', '.join(RULE_KEYS)} (or write REGEX=skip)")
        if key in ("bits", "group_size"):
            try:
                out[key] = int(value)
            except ValueError:
                raise QuantConfigError(f"--rule {text!r}: {key} must be an integer, got {value!r}") from None
        elif value.lower() in ("true", "1", "yes", "false", "0", "no"):
            out[key] = value.lower() in ("true", "1", "yes")
        else:
            raise QuantConfigError(f"--rule {text!r}: {key} must be true or false, got {value!r}")
    return f"+:{regex}", out


def build_rules(keep: Sequence[str] = (), rules: Sequence[str] = (), existing: Mapping | None = None,
                errors: Mapping[str, float] | None = None) -> dict | None:
    """The ordered `dynamic` rules: `existing` first, then --keep (in order), then --rule (in order).

    `errors` (module -> GPTQ error) resolves `--keep crucial`."""
    out: dict = dict(existing or {})

    def add(pattern: str, settings: dict, given: str) -> None:
        if pattern in out and out[pattern] != settings:
            raise QuantConfigError(f"conflicting precision rules: {given!r} sets {rule_regex(pattern)!r} to "
                                   f"{settings or 'full precision'}, an earlier rule to {out[pattern] or 'full precision'}")
        out[pattern] = settings

    for k in keep:
        if k == "crucial":
            if errors is None:
                raise QuantConfigError("--keep crucial needs measured GPTQ errors (internal: none were passed)")
            add(crucial_pattern(errors), {}, k)
        elif k in PRESETS:
            add(PRESETS[k], {}, k)
        else:
            add(f"-:{k}", {}, k)
    for r in rules:
        add(*parse_rule(r), r)
    return out or None


def check_rules(dynamic: Mapping | None, names: Iterable[str], fmt: str, quiet: bool = False) -> None:
    """Refuse rules that match none of `names` (the quantizable modules) and rules that earlier rules
    shadow completely with a different outcome. A shadowed rule with the same outcome is only logged (not
    when `quiet`: a first check, made again later)."""
    if not dynamic:
        return
    check_dynamic(dict(dynamic), fmt)
    names = list(names)
    decided_by = {n: matching_rule(dynamic, n) for n in names}
    leaves = sorted({_type_of(n) for n in names})
    for pattern, settings in dynamic.items():
        hits = [n for n in names if re.match(rule_regex(pattern), n)]
        if not hits:
            near = difflib.get_close_matches(rule_regex(pattern), [*PRESETS, "crucial"], n=1, cutoff=0.6)
            hint = f" (did you mean --keep {near[0]}?)" if near and pattern.startswith("-:") else ""  # a preset's typo
            raise QuantConfigError(f"precision rule {rule_regex(pattern)!r} matches no module of this model{hint} "
                                   f"(full names such as {names[0] if names else '?'!r} are matched from the start; "
                                   f"its linear layers are {leaves}): fix the regex, e.g. '.*{leaves[0] if leaves else ''}'")
        winners = {decided_by[n] for n in hits}
        if pattern in winners:
            continue
        differ = [w for w in winners if w.startswith("-:") != pattern.startswith("-:") or dynamic[w] != settings]
        what = "full precision" if pattern.startswith("-:") else settings
        if differ:
            raise QuantConfigError(f"conflicting precision rules: {rule_regex(pattern)!r} ({what}) never applies, "
                                   f"because the earlier rule {rule_regex(differ[0])!r} decides all of its "
                                   f"{len(hits)} module(s) otherwise (first match wins): put the narrower rule first")
        if not quiet:
            log.info("precision rule %r is redundant: earlier rules already give its modules the same setting",
                     rule_regex(pattern))


def check_precision_first(keep: Sequence[str], rules: Sequence[str], existing: Mapping | None, config,
                          fmt: str) -> None:
    """--keep and --rule checked against the module names of `config`'s model (its skeleton on the meta
    device) before any weights, calibration or measuring, so that a typo fails at once. The full rules are
    checked again when quantizing."""
    dynamic = build_rules([k for k in keep if k != "crucial"], rules, existing)
    if not dynamic:
        return
    names = quantizable_names(*decoder_layers(build_empty_model(config, torch.float32)))
    # --keep crucial's modules are known once measured, and its rule may decide a module first and so settle
    # a conflict between later rules: with it, each rule is checked alone (a valid regex matching a module)
    for part in ([{p: s} for p, s in dynamic.items()] if "crucial" in keep else [dynamic]):
        check_rules(part, names, fmt, quiet=True)


def quantizable_names(layers_name: str, layers: nn.ModuleList) -> list[str]:
    """Full names of the decoder blocks' linears (what precision rules are matched against)."""
    return [f"{layers_name}.{i}.{n}" for i, block in enumerate(layers)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def layer_stats(layer: nn.Module) -> dict:
    """Storage per weight of a packed layer (codes + group statistics + outliers), and its outliers."""
    if hasattr(layer, "average_bits"):  # SpQR
        return {"avg_bits": round(layer.average_bits, 4), "outliers": layer.nnz,
                "outlier_fraction": round(layer.outlier_fraction, 6), "stat_bits": layer.stat_bits,
                "stat_group_size": layer.stat_group_size}
    gs = layer.in_features if layer.group_size == -1 else layer.group_size
    return {"avg_bits": round(layer.bits + (16 + layer.bits) / gs, 4)}  # fp16 scale + packed zero per group


def summarize(report) -> dict:
    """Model-wide figures over the decoder linears: average bits per weight (full-precision ones at 16),
    quantized and kept counts, SpQR's outlier fraction."""
    mods = [m for m in report.modules.values() if "params" in m]
    total = sum(m["params"] for m in mods)
    if not total:
        return {}
    out = {"avg_bits": round(sum(m["params"] * m.get("avg_bits", m["bits"]) for m in mods) / total, 4),
           "quantized_modules": sum(1 for m in mods if m["bits"] != 16), "kept_modules": len(report.kept)}
    quantized = [m for m in mods if m["bits"] != 16]
    if quantized:
        weights = sum(m["params"] for m in quantized)
        out["avg_bits_quantized"] = round(sum(m["params"] * m["avg_bits"] for m in quantized) / weights, 4)
    spqr = [m for m in mods if "outliers" in m]
    if spqr:
        out["outlier_fraction"] = round(sum(m["outliers"] for m in spqr) / sum(m["params"] for m in spqr), 6)
    return out


FUSED_UNITS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # what vLLM/SGLang fuse into one


def split_fused_units(cfg, names: Iterable[str]) -> list[str]:
    """Modules that serving engines fuse (q/k/v, gate/up) but the rules give different settings; each entry
    names the unit and its members' settings. Engines resolve one setting per fused module."""
    names = set(names)
    out = []
    for name in sorted(names):
        prefix, _, leaf = name.rpartition(".")
        for unit in FUSED_UNITS:
            if leaf != unit[0]:
                continue
            members = [f"{prefix}.{m}" for m in unit if f"{prefix}.{m}" in names]
            settings = {m.rsplit(".", 1)[-1]: cfg.for_module(m) for m in members}
            if len({json.dumps(s, sort_keys=True) for s in settings.values()}) > 1:
                desc = ", ".join(f"{k}: {'fp16' if v is None else v['bits']}" for k, v in settings.items())
                out.append(f"{prefix} ({desc})")
    return out
