"""The one quantization path: `gptqlora quantize`, `finetune --base_model` and `merge --to gptq` all call
`quantize` with a `QuantConfig` (what the checkpoint records) and `QuantizeOptions` (how to get there).

    quantize("llama-7b", "llama-7b-4bit", QuantConfig(bits=4, group_size=128),
             QuantizeOptions(calibration="calib.jsonl"))
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from gptqlora.checkpoint.config import QuantConfig, QuantConfigError
from gptqlora.checkpoint.io import CheckpointError
from gptqlora.data.calibration import CalibrationError, calibration_from_data, load_calibration
from gptqlora.data.templates import PromptTemplate
from gptqlora.formats.gptq import FORMAT_V1
from gptqlora.formats.spqr import FORMAT_SPQR
from gptqlora.paths import require_dir
from gptqlora.quant.driver import QuantizeReport, TensorSource, check_token_ids, quantize_model
from gptqlora.quant.precision import KEEP_HELP, build_rules, read_errors
from gptqlora.quant.solvers import SOLVERS

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FILE_SEQLEN = 2048  # tokens per sample cut from a calibration file


@dataclass
class QuantizeOptions:
    """The calibration data, the solver and the per-module precision a quantization runs with."""

    method: str = field(default="gptq", metadata={
        "help": "gptq; rtn (round-to-nearest, the baseline); or spqr (small groups with 3-bit statistics and "
                "fp16 outliers, written in the spqr format; its group size defaults to 16, zeros to asymmetric)",
        "choices": tuple(SOLVERS)})
    calibration: Optional[str] = field(default=None, metadata={
        "help": "calibration data: a .txt file, or .json/.jsonl records with a 'text' field or an 'input_ids' "
                "field (token lists, used as given); finetune and merge default to the training data"})
    nsamples: int = field(default=128, metadata={"min": 1, "help": "calibration samples"})
    seqlen: Optional[int] = field(default=None, metadata={"min": 1,
        "help": f"tokens per calibration sample (default: the training cutoff_len in finetune and merge, "
                f"{FILE_SEQLEN} in quantize)"})
    calibration_seed: int = field(default=0, metadata={"help": "seed for picking calibration samples"})
    dtype: str = field(default="float16", metadata={
        "help": "dtype of the non-quantized weights in the output", "choices": tuple(DTYPES)})
    keep: list[str] = field(default_factory=list, metadata={"help": KEEP_HELP, "append": True,
                                                           "metavar": "ffn|attn|crucial|REGEX"})
    rule: list[str] = field(default_factory=list, metadata={
        "help": "a per-module precision rule, 'REGEX=bits:B[,group_size:G,sym:BOOL,desc_act:BOOL]' or "
                "'REGEX=skip', matched against full module names (e.g. 'model.layers.0.mlp.down_proj') from "
                "the start; rules apply in order after --keep, the first match decides; repeatable. Saved as "
                "GPTQModel's `dynamic`", "append": True, "metavar": "REGEX=SETTINGS"})
    crucial_from: Optional[str] = field(default=None, metadata={
        "help": "--keep crucial: read the per-module GPTQ errors from this quant_report.json or `gptqlora "
                "analyze` analysis.json instead of measuring them first"})
    outlier_fraction: Optional[float] = field(default=None, metadata={
        "help": "--method spqr: fraction of weights kept as fp16 outliers, in (0, 0.1]; the threshold is "
                "searched per layer to hit it (default 0.01)"})
    outlier_threshold: Optional[float] = field(default=None, metadata={
        "help": "--method spqr: relative outlier threshold T instead of a target fraction (a weight is an "
                "outlier when its inverse-Hessian-weighted error exceeds T times the layer's mean)"})

    def __post_init__(self) -> None:
        if self.outlier_fraction is not None and not 0 < self.outlier_fraction <= 0.1:
            raise QuantConfigError(f"--outlier-fraction {self.outlier_fraction}: must be in (0, 0.1] (e.g. 0.01 "
                                   f"for 1% of the weights)")
        if self.outlier_threshold is not None and not self.outlier_threshold > 0:
            raise QuantConfigError(f"--outlier-threshold {self.outlier_threshold}: must be positive (e.g. 0.2)")
        if self.outlier_fraction is not None and self.outlier_threshold is not None:
            raise QuantConfigError("give --outlier-fraction or --outlier-threshold, not both")
        if self.method != "spqr" and (self.outlier_fraction is not None or self.outlier_threshold is not None):
            raise QuantConfigError(f"--outlier-fraction and --outlier-threshold apply to --method spqr, not "
                                   f"--method {self.method}")
        if self.crucial_from and "crucial" not in self.keep:
            raise QuantConfigError("--crucial-from is read by --keep crucial; add --keep crucial or drop it")

    @staticmethod
    def dependent_defaults(values: dict) -> dict:
        """Defaults that follow --method: SpQR's small groups (16) and asymmetric zeros, unless given."""
        if values.get("method") == "spqr":
            values = {"group_size": 16, "sym": False, **values}
        return values

    def solver_options(self, qcfg: QuantConfig) -> dict:
        """The extra arguments of the solver's `quantize` (SpQR's statistics and outliers)."""
        if self.method != "spqr":
            return {}
        fraction = self.outlier_fraction if self.outlier_threshold is None else None
        return {"stat_bits": qcfg.stat_bits, "stat_group_size": qcfg.stat_group_size,
                "outlier_fraction": 0.01 if fraction is None and self.outlier_threshold is None else fraction,
                "outlier_threshold": self.outlier_threshold}


@dataclass
class TrainingData:
    """The training a quantization belongs to (finetune, merge): its records are the default calibration
    data, rendered as training renders them, and its cutoff_len the default sample length."""

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
        samples = load_calibration(options.calibration, tokenizer, options.nsamples, seqlen,
                                   options.calibration_seed)
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
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({str(e).splitlines()[0]}); the "
                                  f"model folder needs its tokenizer files") from None
    if options.method == "spqr" and qcfg.format != FORMAT_SPQR:
        qcfg = dataclasses.replace(qcfg, format=FORMAT_SPQR)  # SpQR layers have their own format
    elif options.method != "spqr" and qcfg.format == FORMAT_SPQR:
        raise QuantConfigError(f"the {FORMAT_SPQR} format is written by --method spqr, not --method {options.method}")
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
