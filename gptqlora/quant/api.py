"""`gptqlora quantize`: from an fp16/bf16 model dir and a calibration file to a GPTQ checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gptqlora.formats.gptq import FORMAT_V1, FORMAT_V2
from gptqlora.quant.calibration import load_calibration
from gptqlora.quant.config import QuantConfig
from gptqlora.quant.driver import QuantizeReport, quantize_model

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def quantize(model_dir: str | Path, out_dir: str | Path, calibration: str | Path, bits: int = 4,
             group_size: int = 128, desc_act: bool = False, sym: bool = True, static_groups: bool = False,
             damp: float = 0.01, mse: bool = False, fmt: str | None = None, method: str = "gptq",
             nsamples: int = 128, seqlen: int = 2048, seed: int = 0, device: str | None = None,
             dtype: str = "float16", true_sequential: bool = True, max_shard_size: str = "2GB",
             overwrite: bool = False, progress: bool = True) -> QuantizeReport:
    """Quantize a model directory. `fmt` defaults to v1 ("gptq", readable everywhere) for symmetric
    quantization and v2 ("gptq_v2") for asymmetric, whose zero points v1 cannot always store."""
    from transformers import AutoTokenizer

    fmt = fmt or (FORMAT_V1 if sym else FORMAT_V2)
    if fmt == FORMAT_V1 and not sym:
        log.info("asymmetric + v1 format: zero points are kept >= 1 so that v1 can store them")
    qcfg = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, format=fmt,
                       static_groups=static_groups, true_sequential=true_sequential, damp_percent=damp, mse=mse)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = load_calibration(calibration, tokenizer, nsamples, seqlen, seed)
    log.info("calibration: %d samples, %d tokens", len(samples), sum(s.numel() for s in samples))
    return quantize_model(model_dir, out_dir, qcfg, samples, device=device, dtype=DTYPES[dtype], method=method,
                          overwrite=overwrite, max_shard_size=max_shard_size, progress=progress)
