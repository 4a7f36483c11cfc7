"""Sensitivity and outlier analysis (`gptqlora analyze`), streaming one decoder block at a time.

For each block, on the full-precision model's own inputs (nothing is quantized in between):
- each linear's GPTQ error at several bit widths, from one Hessian: the solver's proxy loss (`gptq_error`,
  what quant_report.json records) and the relative output error ||(W - Q) X||^2 / ||W X||^2 (`rel_error`);
- LLM.int8-style activation outliers at each linear's input: the hidden dims where |x| > threshold, in
  how many tokens, and the largest |x|. Linears fed the same tensor (q/k/v, gate/up) form one input site.

`measure_errors` is the one-bit-width version `--keep crucial` runs before quantizing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig

from gptqlora.checkpoint.checkpoint import build_empty_model
from gptqlora.checkpoint.config import QuantConfig
from gptqlora.checkpoint.io import CheckpointError, SafetensorsSource
from gptqlora.devices import resolve_device
from gptqlora.nn.blocks import on_inputs
from gptqlora.quant.driver import TensorSource, _capture_block_inputs, _first, _load_block, _load_outside_blocks
from gptqlora.quant.gptq import GPTQ
from gptqlora.quant.model_utils import decoder_layers

log = logging.getLogger(__name__)


class _NoWriter:
    def add(self, key: str, tensor: torch.Tensor) -> None:
        pass


class _ActStats:
    """Per input dim: tokens with |x| > threshold, and max |x|."""

    def __init__(self, k: int, threshold: float, device: torch.device) -> None:
        self.threshold = threshold
        self.count = torch.zeros(k, dtype=torch.int64, device=device)
        self.max_abs = torch.zeros(k, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).abs().float()  # (T, K)
        self.count += (a > self.threshold).sum(0)
        self.max_abs = torch.maximum(self.max_abs, a.amax(0))
        self.tokens += a.shape[0]


def analyze_model(model_dir: str | Path, samples: list[torch.Tensor], bits: tuple[int, ...] = (2, 3, 4),
                  group_size: int = 128, desc_act: bool = False, sym: bool = True, damp: float = 0.01,
                  act_threshold: float = 6.0, top_k: int = 10, source: TensorSource | None = None, config=None,
                  device: str | torch.device | None = None, progress: bool = True,
                  activations: bool = True) -> dict:
    """The analysis as a JSON-ready dict (see the module docstring)."""
    device = resolve_device(device)
    work_dtype = torch.float32 if device.type == "cpu" else torch.float16
    model_dir = Path(model_dir)
    config = config if config is not None else AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None) is not None:
        raise CheckpointError(f"{model_dir}: this model is already quantized (config.json has "
                              f"quantization_config); analyze the fp16/bf16 model")
    src = source if source is not None else SafetensorsSource(model_dir)
    model = build_empty_model(config, work_dtype)
    layers_name, layers = decoder_layers(model)
    _load_outside_blocks(model, src, layers_name, device, work_dtype, _NoWriter(), work_dtype)
    inputs = _capture_block_inputs(model, layers, samples)
    gptq_error = {str(b): {} for b in bits}
    rel_error = {str(b): {} for b in bits}
    sites: dict[str, dict] = {}  # input site (first linear fed that tensor) -> per-layer outlier stats
    site_of: dict[str, str] = {}  # linear (block-relative name) -> its site
    bar = tqdm(range(len(layers)), desc="analyzing blocks", unit="block", disable=not progress)
    for i in bar:
        prefix = f"{layers_name}.{i}"
        block = _load_block(layers[i], src, prefix, device, work_dtype)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        solvers = {n: GPTQ(m.weight) for n, m in linears.items()}
        acts = {n: _ActStats(m.in_features, act_threshold, device) for n, m in linears.items()}
        first_ptr: dict[int, tuple[str, torch.Tensor]] = {}  # holds the tensors, so no address is reused

        def seen(name, x):
            solvers[name].add_batch(x)
            if name not in site_of:
                site_of[name] = first_ptr.setdefault(x.data_ptr(), (name, x))[0]
            if activations and site_of[name] == name:
                acts[name].add(x)

        with torch.no_grad(), on_inputs(linears, seen):
            outs = [(_first(block(h, **kw)), kw) for h, kw in inputs]
        for n, m in linears.items():
            full = f"{prefix}.{n}"
            H = solvers[n].H
            w = m.weight.detach().float()
            den = float(((w @ H) * w).sum())
            for b in bits:
                s = GPTQ(m.weight)
                s.H, s.nsamples = H.clone(), solvers[n].nsamples
                res = s.quantize(bits=b, group_size=group_size, sym=sym, desc_act=desc_act, damp=damp)
                dw = w - res.dequantize().to(w.device)
                gptq_error[str(b)][full] = res.error
                rel_error[str(b)][full] = float(((dw @ H) * dw).sum()) / den if den else 0.0
            solvers[n] = None
            if activations and site_of.get(n) == n:
                a = acts[n]
                dims = torch.nonzero(a.count).flatten()
                sites.setdefault(n, {"dim": m.in_features, "per_layer": []})["per_layer"].append({
                    "layer": i, "dims": dims.tolist(), "tokens": a.count[dims].tolist(),
                    "max_abs": float(a.max_abs.max()), "tokens_seen": a.tokens})
        inputs = outs
        layers[i].to("meta")
        del block, solvers, acts, first_ptr
    out = {"model": str(model_dir), "layers": len(layers), "bits": list(bits), "group_size": group_size,
           "desc_act": desc_act, "sym": sym, "calibration": {"nsamples": len(samples),
                                                              "tokens": int(sum(s.numel() for s in samples))},
           "gptq_error": gptq_error, "rel_error": rel_error}
    if activations:
        out["activation_outliers"] = {
            "threshold": act_threshold,
            "shared_inputs": {n: s for n, s in sorted(site_of.items()) if n != s},
            "sites": {n: {**v, "top": _top_dims(v["per_layer"], top_k)} for n, v in sites.items()}}
    return out


def _top_dims(per_layer: list[dict], k: int) -> list[dict]:
    """The dims with outliers in the most layers (ties: more tokens), with the layers they occur in."""
    stats: dict[int, dict] = {}
    for entry in per_layer:
        for d, t in zip(entry["dims"], entry["tokens"]):
            s = stats.setdefault(d, {"dim": d, "layers": [], "tokens": 0})
            s["layers"].append(entry["layer"])
            s["tokens"] += t
    ranked = sorted(stats.values(), key=lambda s: (-len(s["layers"]), -s["tokens"], s["dim"]))
    return [{**s, "n_layers": len(s["layers"])} for s in ranked[:k]]


def measure_errors(model_dir: str | Path, samples: list[torch.Tensor], qcfg: QuantConfig,
                   source: TensorSource | None = None, config=None, device=None, progress: bool = True) -> dict:
    """Each decoder linear's GPTQ error (the solver's proxy loss) at qcfg's bits and group size."""
    res = analyze_model(model_dir, samples, (qcfg.bits,), qcfg.group_size, qcfg.desc_act, qcfg.sym,
                        qcfg.damp_percent, source=source, config=config, device=device, progress=progress,
                        activations=False)
    return res["gptq_error"][str(qcfg.bits)]
