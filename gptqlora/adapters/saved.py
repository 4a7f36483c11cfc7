"""A saved LoRA adapter read as tensors: per module, its dense update B·A·scaling (for merge and export)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from gptqlora.adapters.layer import lora_delta
from gptqlora.adapters.model import ADAPTER_WEIGHTS, AdapterError, parse_lora_key, read_adapter_config


class SavedAdapter:
    """A saved LoRA adapter's tensors per module, with its scaling (rank/alpha patterns, rsLoRA, QA-LoRA)."""

    def __init__(self, adapter_dir: str | Path) -> None:
        adapter_dir = Path(adapter_dir)
        self.config = read_adapter_config(adapter_dir)
        self.modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_file(adapter_dir / ADAPTER_WEIGHTS).items():
            parsed = parse_lora_key(key)
            if parsed:
                self.modules.setdefault(parsed[0], {})[parsed[1]] = t
        if not self.modules:
            raise AdapterError(f"{adapter_dir}: the adapter holds no lora_A/lora_B weights")

    def scaling(self, prefix: str) -> float:
        c, leaf = self.config, prefix.rsplit(".", 1)[-1]
        r = (c.rank_pattern or {}).get(leaf, c.r)
        alpha = (c.alpha_pattern or {}).get(leaf, c.lora_alpha)
        return alpha / r**0.5 if c.use_rslora else alpha / r

    def delta(self, prefix: str) -> torch.Tensor | None:
        """Dense update [N, K] fp32 for one module, or None if the adapter does not touch it."""
        ab = self.modules.get(prefix)
        if ab is None:
            return None
        gs = self.config.qalora_group_size if self.config.use_qalora else None
        return lora_delta(ab["A"], ab["B"], self.scaling(prefix), gs)
