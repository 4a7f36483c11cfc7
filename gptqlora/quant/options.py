"""`QuantizeOptions`: how a quantization runs (calibration data, solver, per-module precision), with the
names its options offer. Without torch: `quantize`, `finetune` and `merge` build their `--help` from it;
`gptqlora.quant.api` runs it (and re-exports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from gptqlora.checkpoint.config import QuantConfig, QuantConfigError
from gptqlora.data.templates import DEFAULT_TEMPLATE, available_templates

METHODS = ("gptq", "rtn", "spqr")  # the solvers' names (`gptqlora.quant.solvers.SOLVERS`, which tests check)
DTYPE_NAMES = ("float16", "bfloat16")  # the torch dtypes the non-quantized weights may be written in
FILE_SEQLEN = 2048  # tokens per sample cut from a calibration file
KEEP_HELP = ("keep modules in full precision (fp16 nn.Linear): ffn (gate/up/down_proj), attn (q/k/v/o_proj), "
             "crucial (every down_proj + the two attention projections with the largest GPTQ error, measured "
             "first or read from --crucial-from), or a regex over full module names; repeatable")
CALIBRATION_TEMPLATE_HELP = ("prompt template the calibration file's training records (Alpaca, CoT) are rendered "
                             f"with, as finetune --template renders them: {', '.join(available_templates())} "
                             f"(bundled), or a path to a template JSON file (default {DEFAULT_TEMPLATE}, finetune's; "
                             "chat records use the tokenizer's chat template)")


@dataclass
class QuantizeOptions:
    """The calibration data, the solver and the per-module precision a quantization runs with."""

    method: str = field(default="gptq", metadata={
        "help": "gptq; rtn (round-to-nearest, the baseline); or spqr (small groups with 3-bit statistics and "
                "fp16 outliers, written in the spqr format; its group size defaults to 16, zeros to asymmetric)",
        "choices": METHODS})
    calibration: Optional[str] = field(default=None, metadata={
        "help": "calibration data: a .txt file, or .json/.jsonl records with a 'text' field, an 'input_ids' "
                "field (token lists, used as given), or training records (Alpaca, CoT, chat; rendered with the "
                "prompt template, as training renders them); finetune and merge default to the training data"})
    nsamples: int = field(default=128, metadata={"min": 1, "help": "calibration samples"})
    seqlen: Optional[int] = field(default=None, metadata={"min": 1,
        "help": f"tokens per calibration sample (default: the training cutoff_len in finetune and merge, "
                f"{FILE_SEQLEN} in quantize)"})
    calibration_seed: int = field(default=0, metadata={"help": "seed for picking calibration samples"})
    dtype: str = field(default="float16", metadata={
        "help": "dtype of the non-quantized weights in the output", "choices": DTYPE_NAMES})
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
        for k in self.keep:  # a preset name is a valid regex too; the modules a --keep matches are checked later
            try:
                re.compile(k)
            except re.error as e:
                raise QuantConfigError(f"--keep {k}: not a valid regex ({e}); give ffn, attn, crucial or a regex "
                                       f"over full module names") from None
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
