"""Quantization-aware adapter initialisation: start LoRA from the SVD of the quantization residual.

With the original weights W (fp16 model) and the quantized base Q, a rank-r truncated SVD of the residual
W - dequant(Q) gives B·A·scaling, the best rank-r correction (LoftQ-style). More alternations re-round the
base codes on their existing grid (same scales, zeros and g_idx) to fit W - B·A·scaling, then refit A, B.
Any packed layer of the format registry works for one pass (it only needs `dequantize`); alternations
need a layer that can re-round its codes (`round_to_grid`, as QuantLinear has).
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from gptqlora.adapters.layer import GPTQLoraLinear
from gptqlora.nn.registry import FORMATS

log = logging.getLogger(__name__)


@torch.no_grad()
def svd_init_layer(module: GPTQLoraLinear, weight: torch.Tensor, adapter: str, iters: int = 1) -> None:
    """Initialise lora_A/lora_B of one layer from W [N, K] (its original weight)."""
    if adapter in module.lora_variant:
        raise ValueError("init_method='svd' is not available with QA-LoRA (use_qalora)")
    base = module.base_layer
    if iters > 1 and not hasattr(base, "round_to_grid"):
        raise ValueError(f"svd_iters > 1 re-rounds the base codes, which a {type(base).__name__} cannot do")
    r, scaling = module.r[adapter], module.scaling[adapter]
    w = weight.to(next(base.buffers()).device, torch.float32)
    for it in range(iters):
        resid = w - base.dequantize(torch.float32).t()  # (N, K)
        U, S, Vh = torch.linalg.svd(resid, full_matrices=False)
        root = S[:r].sqrt()
        B = U[:, :r] * root / scaling**0.5  # (N, r)
        A = root[:, None] * Vh[:r] / scaling**0.5  # (r, K)
        if it < iters - 1:
            base.round_to_grid(w - (B @ A) * scaling)
    module.lora_A[adapter].weight.copy_(A.to(module.lora_A[adapter].weight.dtype))
    module.lora_B[adapter].weight.copy_(B.to(module.lora_B[adapter].weight.dtype))


def svd_init(peft_model: torch.nn.Module, config, adapter: str = "default") -> None:
    """Apply the SVD init to every GPTQ-LoRA layer, reading original weights from `config.svd_source`."""
    from gptqlora.checkpoint.io import SafetensorsSource

    src = SafetensorsSource(config.svd_source)
    base_model = peft_model.get_base_model()
    layers = [(n, m) for n, m in base_model.named_modules()
              if isinstance(m, GPTQLoraLinear) and adapter in m.lora_A and FORMATS.is_packed(m.base_layer)]
    for name, module in tqdm(layers, desc="SVD init", unit="layer"):
        svd_init_layer(module, src.get(f"{name}.weight"), adapter, config.svd_iters)
    if config.svd_iters > 1:
        base_model.base_codes_modified = True  # the run must save its own base
    log.info("SVD-initialised %d layers from %s", len(layers), config.svd_source)
