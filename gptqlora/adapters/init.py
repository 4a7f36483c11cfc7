"""Quantization-aware adapter initialisation: start LoRA from the SVD of the quantization residual.

With the original weights W (fp16 model) and the quantized base Q, a rank-r truncated SVD of the residual
W - dequant(Q) gives B·A·scaling, the best rank-r correction (LoftQ-style). More alternations re-round the
base codes on their existing grid (same scales, zeros and g_idx) to fit W - B·A·scaling, then refit A, B.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from gptqlora.adapters.layer import GPTQLoraLinear
from gptqlora.formats.gptq import pack_rows, unpack_cols
from gptqlora.nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)


@torch.no_grad()
def rerround_codes(layer: QuantLinear, target: torch.Tensor) -> None:
    """Set the codes that best fit target [N, K] on the layer's fixed grid (scales, zeros, g_idx)."""
    g = layer.g_idx.long()
    zp = layer.zero_points
    z = (zp.float() if zp.is_floating_point() else unpack_cols(zp, layer.bits).float())[g]  # (K, N)
    s = layer.scales.float()[g]  # (K, N)
    q = torch.clamp(torch.round(target.t().float() / s + z), 0, 2**layer.bits - 1)
    layer.qweight.copy_(pack_rows(q.to(torch.int64), layer.bits).to(layer.qweight.device))


@torch.no_grad()
def svd_init_layer(module: GPTQLoraLinear, weight: torch.Tensor, adapter: str, iters: int = 1) -> None:
    """Initialise lora_A/lora_B of one layer from W [N, K] (its original weight)."""
    if adapter in module.lora_variant:
        raise ValueError("init_method='svd' is not available with QA-LoRA (use_qalora)")
    base: QuantLinear = module.base_layer
    r, scaling = module.r[adapter], module.scaling[adapter]
    w = weight.to(base.qweight.device, torch.float32)
    for it in range(iters):
        resid = w - base.dequantize(torch.float32).t()  # (N, K)
        U, S, Vh = torch.linalg.svd(resid, full_matrices=False)
        root = S[:r].sqrt()
        B = U[:, :r] * root / scaling**0.5  # (N, r)
        A = root[:, None] * Vh[:r] / scaling**0.5  # (r, K)
        if it < iters - 1:
            rerround_codes(base, w - (B @ A) * scaling)
    module.lora_A[adapter].weight.copy_(A.to(module.lora_A[adapter].weight.dtype))
    module.lora_B[adapter].weight.copy_(B.to(module.lora_B[adapter].weight.dtype))


def svd_init(peft_model: torch.nn.Module, config, adapter: str = "default") -> None:
    """Apply the SVD init to every GPTQ-LoRA layer, reading original weights from `config.svd_source`."""
    from gptqlora.quant.io import SafetensorsSource

    src = SafetensorsSource(config.svd_source)
    base_model = peft_model.get_base_model()
    layers = [(n, m) for n, m in base_model.named_modules()
              if isinstance(m, GPTQLoraLinear) and adapter in m.lora_A and isinstance(m.base_layer, QuantLinear)]
    for name, module in tqdm(layers, desc="SVD init", unit="layer"):
        svd_init_layer(module, src.get(f"{name}.weight"), adapter, config.svd_iters)
    if config.svd_iters > 1:
        base_model.base_codes_modified = True  # the run must save its own base
    log.info("SVD-initialised %d layers from %s", len(layers), config.svd_source)
