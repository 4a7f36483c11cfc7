"""Activation-aware LoRA init: A, B that minimise the calibration-weighted residual ||X (W - dequant(Q) - BA)ᵀ||.

For one layer with inputs X (T, K), H = XᵀX + λI = L Lᵀ (Cholesky). Then ||X Eᵀ||_F = ||E L||_F for any
E (N, K), so the best rank-r BA is the truncated SVD of the whitened residual R L = U S Vᵀ, unwhitened:

    B = U_r S_r^½ (N, r),   A = S_r^½ V_rᵀ L⁻¹ (r, K)

Directions the data uses get the rank; directions it never excites get none (the plain SVD init spends
rank on them too). Blocks are processed in order, as in GPTQ: the calibration inputs of block i are block
i-1's outputs *with* its adapters initialised, so each block corrects what reaches it (ApiQ's point:
preserve the activations, not the weights).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gptqlora.adapters.layer import GPTQLoraLinear
from gptqlora.nn.blocks import capture_block_inputs, first_output
from gptqlora.nn.registry import FORMATS

log = logging.getLogger(__name__)


@torch.no_grad()
def whitened_lowrank(resid: torch.Tensor, H: torch.Tensor, r: int, damp: float = 0.01) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """B (N, r), A (r, K) minimising ||(resid - B A) L||_F, with L Lᵀ = H + damp·mean(diag H)·I."""
    K = H.shape[0]
    H = H.double()
    lam = damp * float(torch.diag(H).mean()) or 1e-8
    L = torch.linalg.cholesky(H + lam * torch.eye(K, dtype=H.dtype, device=H.device))  # (K, K) lower
    U, S, Vh = torch.linalg.svd(resid.double() @ L, full_matrices=False)
    root = S[:r].sqrt()
    B = U[:, :r] * root  # (N, r)
    A = torch.linalg.solve_triangular(L, root[:, None] * Vh[:r], upper=False, left=False)  # (r, K): M L⁻¹
    return B.float(), A.float()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError("init_method='aware' needs a decoder-only model with model.layers (LLaMA family)")


@torch.no_grad()
def aware_init(peft_model: nn.Module, weights: Any, samples: Sequence[torch.Tensor], adapter: str = "default",
               damp: float = 0.01, progress: bool = True) -> int:
    """Initialise every GPTQ-LoRA layer of `peft_model` block by block; `weights.get(name + ".weight")` gives
    the original W (N, K) of a layer, `samples` are calibration token ids [1, L]. Returns the layer count."""
    if not samples:
        raise ValueError("init_method='aware' needs calibration samples")
    base_model = peft_model.get_base_model()
    layers = _decoder_layers(base_model)
    prefix = next(n for n, m in base_model.named_modules() if m is layers)
    device = next(p.device for p in base_model.parameters())
    was_training = peft_model.training
    peft_model.eval()  # no LoRA dropout while the inputs of the next blocks are computed
    try:
        return _init_blocks(base_model, layers, prefix, device, weights, samples, adapter, damp, progress)
    finally:
        peft_model.train(was_training)


def _init_blocks(base_model, layers, prefix, device, weights, samples, adapter, damp, progress) -> int:
    inputs = capture_block_inputs(base_model, layers, samples)
    done = 0
    for i in tqdm(range(len(layers)), desc="aware init", unit="block", disable=not progress):
        block = layers[i]
        mods = {n: m for n, m in block.named_modules()
                if isinstance(m, GPTQLoraLinear) and adapter in m.lora_A and FORMATS.is_packed(m.base_layer)}
        for m in mods.values():
            if adapter in m.lora_variant:
                raise ValueError("init_method='aware' is not available with QA-LoRA (use_qalora)")
        hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
                    for n, m in mods.items()}

        def hook(mod, inp, out, name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()  # (T, K)
            hessians[name] += x.t() @ x

        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: hook(mod, inp, out, n)) for n, m in mods.items()]
        try:
            for h, kw in inputs:  # B = 0 still: the inputs of each layer under the quantized block
                block(h, **kw)
        finally:
            for hk in hooks:
                hk.remove()
        for n, m in mods.items():
            w = weights.get(f"{prefix}.{i}.{n}.weight").to(device, torch.float32)  # (N, K)
            resid = w - m.base_layer.dequantize(torch.float32).t()
            r, scaling = m.r[adapter], m.scaling[adapter]
            B, A = whitened_lowrank(resid, hessians.pop(n), r, damp)
            m.lora_A[adapter].weight.copy_((A / scaling**0.5).to(m.lora_A[adapter].weight.dtype))
            m.lora_B[adapter].weight.copy_((B / scaling**0.5).to(m.lora_B[adapter].weight.dtype))
            done += 1
        inputs = [(first_output(block(h, **kw)), kw) for h, kw in inputs]  # with this block's adapters on
    log.info("activation-aware init of %d layers from %d calibration samples", done, len(samples))
    return done
