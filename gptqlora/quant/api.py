"""The one quantization path: `gptqlora quantize`, `finetune --base_model` and `merge --to gptq` all call
`quantize` with a `QuantConfig` (what the checkpoint records) and `QuantizeOptions` (how to get there).

    quantize("llama-7b", "llama-7b-4bit", QuantConfig(bits=4, group_size=128),
             QuantizeOptions(calibration="calib.jsonl"))
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from gptqlora.checkpoint.config import QuantConfig, QuantConfigError
from gptqlora.checkpoint.io import CheckpointError
from gptqlora.data.calibration import CalibrationError, calibration_from_data, load_calibration
from gptqlora.data.templates import PromptTemplate
from gptqlora.formats.gptq import FORMAT_V1
from gptqlora.formats.spqr import FORMAT_SPQR
from gptqlora.paths import require_dir
from gptqlora.quant.driver import QuantizeReport, TensorSource, check_token_ids, quantize_model
from gptqlora.quant.options import DTYPE_NAMES, FILE_SEQLEN, QuantizeOptions  # QuantizeOptions: imported from here too
from gptqlora.quant.precision import build_rules, check_precision_first, read_errors

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class TrainingData:
    """The training a quantization belongs to (finetune, merge): its records are the default calibration
    data, rendered as training renders them, and its cutoff_len the default sample length. Without files
    (quantize, analyze: --calibration is required there) only its template is used, for the calibration
    file's training records."""

    files: Sequence[str | Path]
    template: PromptTemplate
    cutoff_len: int | None = None


def calibration_samples(options: QuantizeOptions, tokenizer: Any, training: TrainingData | None = None,
                        max_positions: int | None = None, vocab_size: int | None = None) -> list[torch.Tensor]:
    """From `options.calibration` when given, else from the training records; samples are at most the
    model's `max_positions` long (a longer --seqlen is refused, the default is lowered to it), and their
    token ids must be below `vocab_size`."""
    seqlen = default = options.seqlen or (training.cutoff_len if training is not None else None) or FILE_SEQLEN
    if max_positions and seqlen > max_positions:
        if options.seqlen:
            raise CalibrationError(f"--seqlen {options.seqlen}: longer than the model's context "
                                   f"(max_position_embeddings {max_positions}); use at most {max_positions}")
        seqlen = max_positions
    if options.calibration:
        samples = load_calibration(options.calibration, tokenizer, options.nsamples, seqlen, options.calibration_seed,
                                   training.template if training is not None else None)  # as training renders
    elif training is None or not training.files:
        raise CalibrationError("quantizing needs calibration data: pass --calibration FILE")
    else:
        samples = calibration_from_data(training.files, tokenizer, training.template, options.nsamples, seqlen,
                                        options.calibration_seed)
    if vocab_size:
        check_token_ids(samples, vocab_size)
    if seqlen < default:
        log.info("calibration samples of %d tokens: the model's context (max_position_embeddings) is shorter "
                 "than the default %d", seqlen, default)
    return samples


def quantize(model_dir: str | Path, out_dir: str | Path, qcfg: QuantConfig, options: QuantizeOptions | None = None,
             *, tokenizer: Any = None, training: TrainingData | None = None, source: TensorSource | None = None,
             config: Any = None, device: str | torch.device | None = None, max_shard_size: str = "2GB",
             overwrite: bool = False, progress: bool = True) -> QuantizeReport:
    """Quantize the model in `model_dir` (its config and tokenizer; weights from its safetensors, or from
    `source`, e.g. a merge computing them) into a checkpoint in `out_dir`."""
    from transformers import AutoConfig

    options = options or QuantizeOptions()
    model_dir = require_dir(model_dir, "model folder")
    if config is None:
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"{model_dir}: no config.json; not a Hugging Face model folder")
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if options.method == "spqr" and qcfg.format != FORMAT_SPQR:
        qcfg = dataclasses.replace(qcfg, format=FORMAT_SPQR)  # SpQR layers have their own format
    elif options.method != "spqr" and qcfg.format == FORMAT_SPQR:
        raise QuantConfigError(f"the {FORMAT_SPQR} format is written by --method spqr, not --method {options.method}")
    if options.keep or options.rule:  # a bad --keep / --rule fails here, before the tokenizer, any log or weight
        check_precision_first(options.keep, options.rule, qcfg.dynamic, config, qcfg.format)
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({str(e).splitlines()[0]}); the "
                                  f"model folder needs its tokenizer files") from None
    if qcfg.format == FORMAT_V1 and not qcfg.sym:
        log.info("asymmetric + v1 format: zero points are kept >= 1 so that v1 can store them")
    widths = sorted({w for w in (getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None))
                     if isinstance(w, int)})
    if qcfg.group_size > 0 and any(w % qcfg.group_size for w in widths):
        log.warning("--group-size %d does not divide the layers' input widths %s: their last group is partial. "
                    "gptqlora loads such a checkpoint, but vLLM (export) refuses it; a power of two such as 128 "
                    "divides LLaMA-family widths", qcfg.group_size, widths)
    if options.crucial_from:  # before any work: a bad file is refused at once
        errors = read_errors(options.crucial_from)
    samples = calibration_samples(options, tokenizer, training, getattr(config, "max_position_embeddings", None),
                                  getattr(config, "vocab_size", None))
    log.info("calibration: %d samples, %d tokens", len(samples), sum(s.numel() for s in samples))
    if "crucial" in options.keep and not options.crucial_from:
        from gptqlora.quant.analysis import measure_errors

        log.info("--keep crucial: measuring each module's GPTQ error at %d bit first", qcfg.bits)
        errors = measure_errors(model_dir, samples, qcfg, source=source, config=config, device=device,
                                progress=progress)
    if options.keep or options.rule:
        rules = build_rules(options.keep, options.rule, qcfg.dynamic, errors if "crucial" in options.keep else None)
        qcfg = dataclasses.replace(qcfg, dynamic=rules)
        log.info("precision rules (first match decides): %s", rules)
    return quantize_model(model_dir, out_dir, qcfg, samples, device=device, dtype=DTYPES[options.dtype],
                          method=options.method, source=source, config=config, overwrite=overwrite,
                          max_shard_size=max_shard_size, progress=progress,
                          solver_options=options.solver_options(qcfg))
