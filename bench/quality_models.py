"""The two models of the quality findings, each with its calibration samples and held-out text.

- tiny: the bundled tiny LLaMA (synthetic tasks); calibration from the bundled training records; held-out
  perplexity on the response tokens of the bundled eval records (what the model was trained to predict:
  its prompts hold random strings it was never trained on), rendered as fine-tuning renders them.
- manpage: the LLaMA trained on manual pages by scripts/train_text_llama.py (bench/assets/manpage-llama);
  calibration from its train.txt, held-out text its test.txt (held-out page names; 70% of its text copies
  training pages under other names); windows of 256 tokens. manpage-v2: the same built with `--split content`
  (bench/assets/manpage-llama-v2; no scored page is a training page's text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

MANPAGE_DIR = Path(__file__).parent / "assets" / "manpage-llama"
MANPAGE_V2_DIR = Path(__file__).parent / "assets" / "manpage-llama-v2"  # held out by content (docs/results.md)


@dataclass
class ModelSpec:
    name: str
    model_dir: Path
    calibration: list[torch.Tensor]  # [1, seqlen] token windows
    eval_ids: torch.Tensor | None  # (T,) held-out text tokens (manpage), or
    eval_examples: list[dict] | None  # encoded held-out records, prompt masked (tiny)
    seqlen: int
    train_text: Path | None = None  # fine-tuning text (manpage) or None (tiny: the bundled records)

    def score(self, model) -> dict:
        """{"perplexity", "nll", "tokens"} of a model on this spec's held-out data."""
        from gptqlora.eval.perplexity import perplexity, response_perplexity

        if self.eval_examples is not None:
            return response_perplexity(model, self.eval_examples, batch_size=50)
        return perplexity(model, self.eval_ids, self.seqlen, batch_size=8)


def tiny_spec(nsamples: int = 64, seed: int = 0) -> ModelSpec:
    from transformers import AutoTokenizer

    from gptqlora.data.assets import default_data_files, eval_data_files, tiny_model_dir
    from gptqlora.data.calibration import calibration_from_data
    from gptqlora.data.dataset import build_datasets
    from gptqlora.data.templates import PromptTemplate

    d = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    tpl = PromptTemplate.load("alpaca")
    calib = calibration_from_data(default_data_files(), tok, tpl, nsamples, 128, seed)
    held, _ = build_datasets(eval_data_files(), tok, tpl, cutoff_len=128)
    return ModelSpec("tiny", d, calib, None, [dict(r) for r in held], 128)


def manpage_spec(nsamples: int = 64, model_dir: Path = MANPAGE_DIR, seed: int = 0, name: str = "manpage") -> ModelSpec:
    from transformers import AutoTokenizer

    from gptqlora.data.calibration import load_calibration
    from gptqlora.eval.perplexity import text_ids

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no model; build it with python scripts/train_text_llama.py "
                                f"--out {model_dir}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = load_calibration(model_dir / "train.txt", tok, nsamples, 256, seed=seed)
    ids = text_ids(tok, (model_dir / "test.txt").read_text())
    return ModelSpec(name, model_dir, calib, ids, None, 256, model_dir / "train.txt")


def manpage_v2_spec(nsamples: int = 64, seed: int = 0) -> ModelSpec:
    """The v2 man-page model (its test.txt holds no copy of a training page)."""
    return manpage_spec(nsamples, MANPAGE_V2_DIR, seed, "manpage-v2")


SPECS = {"tiny": tiny_spec, "manpage": manpage_spec, "manpage-v2": manpage_v2_spec}
VAL_FRAC = 0.1  # the end of train.txt held out of fine-tuning: where the LoRA protocol was chosen


def train_text_split(spec: ModelSpec, tokenizer, val_frac: float = VAL_FRAC) -> tuple[torch.Tensor, torch.Tensor]:
    """(fine-tuning ids, validation ids) of spec.train_text: validation is its last `val_frac` of tokens
    (whole pages but the first, train.txt being shuffled pages), never trained on; test.txt stays the score."""
    if spec.train_text is None:
        raise ValueError(f"{spec.name}: no training text to split")
    ids = tokenizer(spec.train_text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    cut = int(ids.numel() * (1 - val_frac))
    return ids[:cut], ids[cut:]


def fp_perplexity(spec: ModelSpec) -> dict:
    from transformers import AutoModelForCausalLM

    return spec.score(AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32))


def quantized_perplexity(qdir: Path, spec: ModelSpec) -> dict:
    from gptqlora.checkpoint.checkpoint import load_quantized
    return spec.score(load_quantized(qdir, device="cpu", dtype=torch.float32))
