"""Activation-aware LoRA init: A, B that minimise the calibration-weighted residual ||X (W - dequant(Q) - BA)ᵀ||.

For one layer with inputs X (T, K), H = XᵀX + λI = L Lᵀ (Cholesky). Then ||X Eᵀ||_F = ||E L||_F for any
E (N, K), so the best rank-r BA is the truncated SVD of the whitened residual R L = U S Vᵀ, unwhitened:

    B = U_r S_r^½ (N, r),   A = S_r^½ V_rᵀ L⁻¹ (r, K)

Directions the data uses get the rank; directions it never excites get none (the plain SVD init spends
rank on them too). Blocks are processed in order, as in GPTQ: the calibration inputs of block i are block
i-1's outputs *with* its adapters initialised, so each block corrects what reaches it (ApiQ's point:
preserve the activations, not the weights).

`output_init` (init_method='output') changes the target, not the solver: it fits what the layer should
*output* rather than the weights it had. With X_q the layer's inputs in the quantized model (earlier blocks,
and earlier layers of the same block, with their adapters initialised) and X_fp the same layer's inputs in
the fp model on the same tokens, it minimises ||X_q (Q + BA)ᵀ - X_fp W_fpᵀ||² + λ||Q + BA - W_fp||². With
Hd = X_qᵀX_q + λI and C = X_qᵀX_fp that is ||(W* - Q - BA) L||² + const, L Lᵀ = Hd, for the least-squares
target W* = W_fp (Cᵀ + λI) Hd⁻¹: the same whitened SVD, of W* - Q instead of W_fp - Q. W* is the weight
that GPTAQ (asymmetric calibration) rounds, so with a GPTAQ base the init corrects toward what the codes
were aiming at, instead of pulling them back to W_fp. It runs an fp copy of each block (weights from the
original model) beside the quantized one.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gptqlora.adapters.layer import GPTQLoraLinear
from gptqlora.nn.blocks import capture_block_inputs, first_output, on_inputs
from gptqlora.nn.registry import FORMATS

log = logging.getLogger(__name__)


@torch.no_grad()
def whitened_lowrank(resid: torch.Tensor, H: torch.Tensor, r: int, damp: float = 0.01,
                     balance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """B (N, r), A (r, K) minimising ||(resid - B A) L||_F, with L Lᵀ = H + damp·mean(diag H)·I.

    The product B A is the fit; `balance` only changes how it is split into factors: B = U' S'^½,
    A = S'^½ V'ᵀ from the plain SVD of B A (as the SVD init splits), instead of B = U S^½, A = S^½ Vᵀ L⁻¹
    with S the singular values of the *whitened* residual: those carry the activations' scale, so B comes
    out far larger than A (or smaller). Training starts from the same model either way, but not with the
    same steps (docs/results.md: the balanced split trained better)."""
    K = H.shape[0]
    H = H.double()
    lam = _damping(H, damp)
    L = torch.linalg.cholesky(H + lam * torch.eye(K, dtype=H.dtype, device=H.device))  # (K, K) lower
    U, S, Vh = torch.linalg.svd(resid.double() @ L, full_matrices=False)
    root = S[:r].sqrt()
    B = U[:, :r] * root  # (N, r)
    A = torch.linalg.solve_triangular(L, root[:, None] * Vh[:r], upper=False, left=False)  # (r, K): M L⁻¹
    if balance:
        B, A = balanced_factors(B, A)
    return B.float(), A.float()


def _damping(H: torch.Tensor, damp: float) -> float:
    """λ = damp·mean(diag H) (a tiny floor for an all-zero H): the one damping of the whitening and the target."""
    return damp * float(torch.diag(H).mean()) or 1e-8


def balanced_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product B A (N, K) of rank <= r, split as U S^½, S^½ Vᵀ from its SVD (via two thin QRs and
    an r x r SVD, never forming B A)."""
    Qb, Rb = torch.linalg.qr(B)  # (N, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.t())  # (K, r), (r, r)
    u, s, vh = torch.linalg.svd(Rb @ Ra.t())
    root = s.sqrt()
    return (Qb @ u) * root, root[:, None] * (Qa @ vh.t()).t()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError("init_method='aware' needs a decoder-only model with model.layers (LLaMA family)")


# the order in which a block's layers are initialised by output_init (GPTQ's true-sequential order): each
# group sees the outputs of the groups before it with their adapters on; layers not named here come last
SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


@torch.no_grad()
def aware_init(peft_model: nn.Module, weights: Any, samples: Sequence[torch.Tensor], adapter: str = "default",
               damp: float = 0.01, progress: bool = True) -> int:
    """Initialise every GPTQ-LoRA layer of `peft_model` block by block; `weights.get(name + ".weight")` gives
    the original W (N, K) of a layer, `samples` are calibration token ids [1, L]. Returns the layer count."""
    return _run(peft_model, weights, samples, adapter, damp, progress, "aware")


@torch.no_grad()
def output_init(peft_model: nn.Module, weights: Any, samples: Sequence[torch.Tensor], adapter: str = "default",
                damp: float = 0.01, progress: bool = True) -> int:
    """Initialise every GPTQ-LoRA layer so that, on `samples`, its output under the quantized model's inputs
    matches the fp model's output of that layer (the module docstring); `weights` as for `aware_init`, and
    every tensor of the decoder blocks must be in it (the fp blocks are rebuilt from it). A, B are the
    balanced split of the fit (`whitened_lowrank(balance=True)`)."""
    return _run(peft_model, weights, samples, adapter, damp, progress, "output")


def _run(peft_model, weights, samples, adapter, damp, progress, target) -> int:
    if not samples:
        raise ValueError(f"init_method={target!r} needs calibration samples")
    base_model = peft_model.get_base_model()
    layers = _decoder_layers(base_model)
    prefix = next(n for n, m in base_model.named_modules() if m is layers)
    device = next(p.device for p in base_model.parameters())
    was_training = peft_model.training
    peft_model.eval()  # no LoRA dropout while the inputs of the next blocks are computed
    try:
        if target == "output":
            return _output_blocks(base_model, layers, prefix, device, weights, samples, adapter, damp, progress)
        return _init_blocks(base_model, layers, prefix, device, weights, samples, adapter, damp, progress)
    finally:
        peft_model.train(was_training)


def _lora_layers(block: nn.Module, adapter: str, method: str) -> dict[str, GPTQLoraLinear]:
    mods = {n: m for n, m in block.named_modules()
            if isinstance(m, GPTQLoraLinear) and adapter in m.lora_A and FORMATS.is_packed(m.base_layer)}
    for m in mods.values():
        if adapter in m.lora_variant:
            raise ValueError(f"init_method={method!r} is not available with QA-LoRA (use_qalora)")
    return mods


def _set_lora(m: GPTQLoraLinear, adapter: str, B: torch.Tensor, A: torch.Tensor) -> None:
    scaling = m.scaling[adapter]
    m.lora_A[adapter].weight.copy_((A / scaling**0.5).to(m.lora_A[adapter].weight.dtype))
    m.lora_B[adapter].weight.copy_((B / scaling**0.5).to(m.lora_B[adapter].weight.dtype))


def _init_blocks(base_model, layers, prefix, device, weights, samples, adapter, damp, progress) -> int:
    inputs = capture_block_inputs(base_model, layers, samples)
    done = 0
    for i in tqdm(range(len(layers)), desc="aware init", unit="block", disable=not progress):
        block = layers[i]
        mods = _lora_layers(block, adapter, "aware")
        hessians = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
                    for n, m in mods.items()}

        def add(name, x):
            x = x.detach().reshape(-1, x.shape[-1]).double()  # (T, K)
            hessians[name] += x.t() @ x

        with on_inputs(mods, add):
            for h, kw in inputs:  # B = 0 still: the inputs of each layer under the quantized block
                block(h, **kw)
        for n, m in mods.items():
            w = weights.get(f"{prefix}.{i}.{n}.weight").to(device, torch.float32)  # (N, K)
            resid = w - m.base_layer.dequantize(torch.float32).t()
            B, A = whitened_lowrank(resid, hessians.pop(n), m.r[adapter], damp)
            _set_lora(m, adapter, B, A)
            done += 1
        inputs = [(first_output(block(h, **kw)), kw) for h, kw in inputs]  # with this block's adapters on
    log.info("activation-aware init of %d layers from %d calibration samples", done, len(samples))
    return done


def fp_block(block: nn.Module, weights: Any, prefix: str, dtype: torch.dtype) -> nn.Module:
    """A copy of decoder block `block` (named `prefix` in the model) with every linear layer, LoRA-wrapped or
    packed, replaced by a plain nn.Linear holding the original weights, and every other tensor read from
    `weights` too: the block as it is in the fp model."""
    fp = copy.deepcopy(block)
    swap = [n for n, m in fp.named_modules() if isinstance(m, GPTQLoraLinear) or FORMATS.is_packed(m)]
    swap = [n for n in swap if not any(n.startswith(o + ".") for o in swap)]  # the outermost only
    for n in swap:
        w = weights.get(f"{prefix}.{n}.weight")
        key = f"{prefix}.{n}.bias"
        lin = nn.Linear(w.shape[1], w.shape[0], bias=key in weights, device=w.device, dtype=dtype)
        lin.weight.data = w.to(dtype)
        if lin.bias is not None:
            lin.bias.data = weights.get(key).to(dtype)
        parent, _, leaf = n.rpartition(".")
        setattr(fp.get_submodule(parent) if parent else fp, leaf, lin)
    device = next(p.device for p in block.parameters())
    for name, t in fp.state_dict().items():
        key = f"{prefix}.{name}"
        if key in weights:
            t.copy_(weights.get(key).to(t.dtype))
    return fp.to(device).eval()


def _groups(names: Sequence[str]) -> list[list[str]]:
    groups = [[n for n in g if n in names] for g in SEQUENTIAL]
    rest = [n for n in names if not any(n in g for g in SEQUENTIAL)]
    return [g for g in groups if g] + ([rest] if rest else [])


def _output_blocks(base_model, layers, prefix, device, weights, samples, adapter, damp, progress) -> int:
    inputs = capture_block_inputs(base_model, layers, samples)
    fp_inputs = [h for h, _ in inputs]  # the embeddings are not quantized: block 0 sees the same in both
    done = 0
    for i in tqdm(range(len(layers)), desc="output init", unit="block", disable=not progress):
        block = layers[i]
        fp = fp_block(block, weights, f"{prefix}.{i}", fp_inputs[0].dtype)
        mods = _lora_layers(block, adapter, "output")
        for group in _groups(list(mods)):
            done += _output_group(block, fp, {n: mods[n] for n in group}, inputs, fp_inputs, weights,
                                  f"{prefix}.{i}", adapter, damp, device)
        inputs = [(first_output(block(h, **kw)), kw) for h, kw in inputs]  # with this block's adapters on
        fp_inputs = [first_output(fp(h, **kw)) for h, (_, kw) in zip(fp_inputs, inputs)]
        del fp
    log.info("output-matching init of %d layers from %d calibration samples", done, len(samples))
    return done


def _output_group(block, fp, mods, inputs, fp_inputs, weights, prefix, adapter, damp, device) -> int:
    """Accumulate H = X_qᵀX_q and C = X_qᵀX_fp for the layers of one group (earlier groups' adapters on),
    then set each layer's A, B from the whitened SVD of W* - Q."""
    K = {n: m.in_features for n, m in mods.items()}
    H = {n: torch.zeros(K[n], K[n], dtype=torch.float64, device=device) for n in mods}
    C = {n: torch.zeros(K[n], K[n], dtype=torch.float64, device=device) for n in mods}
    seen: dict[str, torch.Tensor] = {}

    def rows(t):
        return t.detach().reshape(-1, t.shape[-1]).double()

    def on_q(name, x):
        xq = rows(x)
        H[name] += xq.t() @ xq
        C[name] += xq.t() @ rows(seen.pop(name)).to(xq.device)

    with on_inputs({n: fp.get_submodule(n) for n in mods}, seen.__setitem__), on_inputs(mods, on_q):
        for (h, kw), hf in zip(inputs, fp_inputs):
            fp(hf, **kw)
            block(h, **kw)
    for n, m in mods.items():
        w = weights.get(f"{prefix}.{n}.weight").to(device, torch.float64)  # (N, K)
        target = lstsq_target(w, H[n], C.pop(n), damp)
        resid = target - m.base_layer.dequantize(torch.float32).t().double()
        B, A = whitened_lowrank(resid, H.pop(n), m.r[adapter], damp, balance=True)
        _set_lora(m, adapter, B, A)
    return len(mods)


def lstsq_target(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """W* (N, K) minimising ||X_q W*ᵀ - X_fp wᵀ||² + λ||W* - w||², from H = X_qᵀX_q and C = X_qᵀX_fp
    (λ = damp·mean(diag H), the damping of `whitened_lowrank`): W* = w (Cᵀ + λI) (H + λI)⁻¹."""
    H, C, w = H.double(), C.double(), w.double()
    lam = _damping(H, damp)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve(H + lam * eye, (C + lam * eye) @ w.t()).t()  # Hd symmetric: (Hd⁻¹ (C + λ) wᵀ)ᵀ
