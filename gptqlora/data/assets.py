"""Paths of the bundled assets (tiny model, synthetic data), found through importlib.resources."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DATA_FILES = ("alpaca_synth.jsonl", "cot_synth.jsonl")
EVAL_FILES = ("alpaca_synth_eval.jsonl", "cot_synth_eval.jsonl")


def assets_dir() -> Path:
    """The ``gptqlora/assets`` folder on disk (the package must be installed unzipped)."""
    root = resources.files("gptqlora.assets")
    path = Path(str(root))
    if not path.is_dir():
        raise FileNotFoundError(f"gptqlora assets are not on the file system ({root}); install unzipped")
    return path


def tiny_model_dir() -> Path:
    """Folder of the bundled tiny LLaMA model + tokenizer (loads with ``from_pretrained``)."""
    path = assets_dir() / "tiny-llama"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the tiny model is missing from {path}; run scripts/train_tiny_base.py")
    return path


def _data_files(names: tuple[str, ...]) -> list[Path]:
    paths = [assets_dir() / "data" / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"bundled data files missing: {missing}; run scripts/train_tiny_base.py")
    return paths


def default_data_files() -> list[Path]:
    """The bundled synthetic training files (Alpaca string tasks, CoT arithmetic)."""
    return _data_files(DATA_FILES)


def eval_data_files() -> list[Path]:
    """The bundled held-out eval files (200 records each, disjoint from the training files)."""
    return _data_files(EVAL_FILES)
