"""SpQR for one linear layer (Dettmers et al. 2023): GPTQ in small groups whose scales and zeros are
quantized again (3 bit, in groups of `stat_group_size` output channels), with unstructured fp16 outliers
chosen inside the GPTQ pass.

    solver = SpQR(layer.weight); solver.add_batch(x) ...
    result = solver.quantize(bits=3, group_size=16, stat_bits=3, stat_group_size=16, outlier_fraction=0.01)

Outliers, as in the paper's algorithm (and its reference code):
- when a group starts, each weight's leave-one-out value is measured: how much the group's inverse-Hessian
  weighted error drops when the statistics are fitted without it; weights above the threshold are left out
  of that fit (replaced by their row's mean);
- each weight whose own weighted error ((w - q(w)) / Hinv_chol[j, j])^2 exceeds the threshold becomes an
  outlier: kept as an fp16 residual beside its code, so the GPTQ update sees (almost) no error for it.
The threshold is relative: tau = T * mean_j(var(W[:, j]) / Hinv_chol[j, j]^2). Given T (`outlier_threshold`)
the pass runs once; given a target fraction it is searched (bisection in log space, a few passes).

`quantize` (the models' driver) passes GPTQ's defaults, which SpQR shares: damp .05, the MSE range search of each
first-level group (`mse`) and asymmetric calibration (`gptaq`, alpha 1). Measured on the man-page model (3 bit g16,
stats 3 bit g16, 1% outliers, 3 calibration seeds; bench/results/spqr-realtext-2026-12-06.jsonl), the two together cut the log-ppl
gap to fp16 from 0.0038 to 0.0018 on test.txt and from 0.0045 to 0.0029 on val_heldout.txt, every seed and text.
GPTQ's coordinate descent on the codes (`descent_passes`) is opt-in here (the driver's default for SpQR is 0): on
man-page v2 (docs/results.md section 3, session 18; 3 seeds x 2 texts x 2 settings) it narrowed the log-ppl gap in 7
of 12 pairs and widened it in 5 (mean 0.0164 -> 0.0155), within the seed-to-seed spread.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from gptqlora.formats.spqr import decode_scales, decode_stats, quantize_stats
from gptqlora.quant.gptq import GPTQ, asymmetric_target, damped, descend
from gptqlora.quant.quantizer import QuantResult, dequant, find_params, quantize

log = logging.getLogger(__name__)

START_THRESHOLD = 0.2  # the paper's usual relative threshold
SEARCH_PASSES = 10
SEARCH_TOLERANCE = 0.1  # stop searching once the fraction is within 10% of the target


@dataclass
class SpQRResult(QuantResult):
    """Unpacked SpQR layer. Stat codes [G, N] with second-level step/base [G, N/stat_group_size]; outliers
    as a mask [N, K] and fp16 residuals [N, K] (zero elsewhere); `recon` the reconstruction [N, K]."""

    scales_code: torch.Tensor = None
    scales_step: torch.Tensor = None
    scales_base: torch.Tensor = None
    zeros_code: torch.Tensor = None
    zeros_step: torch.Tensor = None
    zeros_base: torch.Tensor = None
    outlier_mask: torch.Tensor = None
    outlier_residual: torch.Tensor = None
    recon: torch.Tensor = None
    stat_bits: int = 3
    threshold: float = math.inf
    passes: int = 1

    @property
    def outlier_fraction(self) -> float:
        return float(self.outlier_mask.float().mean())

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32: exactly what SpQRLinear.dequantize(fp32) of the packed layer gives (transposed)."""
        return self.recon

    def layer_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in (
            "codes", "g_idx", "scales_code", "scales_step", "scales_base", "zeros_code", "zeros_step",
            "zeros_base", "outlier_mask", "outlier_residual", "stat_bits")}


def leave_one_out_gain(group: torch.Tensor, d: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """For group [N, g] with Hinv_chol diagonal d [g]: the drop of the group's weighted squared error when
    each weight is left out of the statistics (and not quantized), [N, g]."""
    n, g = group.shape
    idx = torch.arange(g, device=group.device)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).to(idx.dtype)  # (g, g-1): all indices but the i-th
    data = group[:, loo]  # (N, g, g-1)
    flat = data.reshape(n * g, g - 1)
    s, z = find_params(flat, bits, sym)
    maxq = 2**bits - 1
    rec = dequant(quantize(flat, s, z, maxq), s, z).reshape_as(data)
    loo_err = ((rec - data) / d[loo]).square().sum(-1)  # (N, g)
    s0, z0 = find_params(group, bits, sym)
    base = ((dequant(quantize(group, s0, z0, maxq), s0, z0) - group) / d).square().sum(1, keepdim=True)
    return base - loo_err


class SpQR(GPTQ):
    """The GPTQ solver's Hessian and Cholesky, with SpQR's statistics and outliers in the column pass."""

    @torch.no_grad()
    def quantize(self, bits: int, group_size: int = 16, sym: bool = False, desc_act: bool = False,
                 static_groups: bool = False, damp: float = 0.01, block_size: int = 128, mse: bool = False,
                 min_zero: int = 0, group_aware: bool = False, *, stat_bits: int = 3, stat_group_size: int = 16,
                 outlier_fraction: float | None = 0.01, outlier_threshold: float | None = None,
                 gptaq: float = 0.0, descent_passes: int = 0) -> SpQRResult:
        """`static_groups`, `min_zero` and `group_aware` do not apply (groups follow the processing order; zeros are
        quantized floats). `mse`: each group's range from GPTQ's clipping search (before its 3-bit statistics).
        `gptaq` (alpha, needs `add_batch(x, fp_inp=...)`): GPTQ's asymmetric calibration, the same target shift.
        `outlier_threshold` (relative T) wins over `outlier_fraction`; neither: no outliers.

        `descent_passes`: after the pass (the searched one), passes of GPTQ's exact coordinate descent (`descend`)
        under the damped H: the codes re-chosen on the decoded 3-bit statistics, which stay as they are; the
        outliers keep their places, each taking its exact optimum (a code plus an fp16 residual). No refit of
        the statistics: re-choosing each group's 3-bit (scale, zero) codes after each pass for the lowest output
        error lowered the calibration error far more (-17% against -2 to -4% on random layers) but widened the
        man-page v2 gaps on val_heldout.txt (seeds 0 / 1: 0.0178 / 0.0131 -> 0.0206 / 0.0213; docs/results.md)."""
        if self.nsamples == 0:
            raise RuntimeError("SpQR.quantize() called before any add_batch()")
        W = self.weight.to(self.H.device, torch.float32).clone()  # (N, K)
        n, k = W.shape
        if n % stat_group_size:
            raise ValueError(f"stat_group_size={stat_group_size} must divide out_features={n}")
        H, self.H = self.H, None
        D, self.D = self.D, None
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        if gptaq and D is not None:
            W = asymmetric_target(W, H, D, gptaq, damp, dead)
        perm = torch.argsort(torch.diag(H), descending=True) if desc_act else None
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        Hinv = self._inverse_cholesky(H, damp)
        Hd = damped(H, damp) if descent_passes else None  # (K, K) processing order, what the descent minimises
        del H
        scale = float((W.var(dim=0) / torch.diag(Hinv).square()).mean()) if n > 1 else 1.0

        def run(t: float, passes: int) -> SpQRResult:
            res = self._pass(W, Hinv, bits, group_size, sym, stat_bits, stat_group_size, t * scale, block_size,
                             mse)
            res.threshold, res.passes = t, passes
            return res

        if outlier_threshold is not None:
            res = run(outlier_threshold, 1)
        elif not outlier_fraction:
            res = run(math.inf, 1)
        else:
            res = self._search(run, outlier_fraction)
        if descent_passes:
            self._descend(res, W, Hd, bits, block_size, descent_passes)
        return self._unpermute(res, perm)

    @staticmethod
    def _search(run, target: float) -> SpQRResult:
        """The relative threshold whose outlier fraction is nearest `target`: bracket, then interpolate
        log(fraction) against log(T) (the fraction falls roughly as a power of T)."""
        tried: list[tuple[float, float]] = []
        best: SpQRResult | None = None  # only the nearest result is kept (each holds several [N, K] tensors)
        t = START_THRESHOLD
        for i in range(SEARCH_PASSES):
            res = run(t, i + 1)
            f = res.outlier_fraction
            tried.append((t, f))
            if best is None or abs(f - target) < abs(best.outlier_fraction - target):
                best = res
            del res
            if abs(f - target) <= SEARCH_TOLERANCE * target:
                break
            over = [(tt, ff) for tt, ff in tried if ff > target]  # threshold too low
            under = [(tt, ff) for tt, ff in tried if ff < target]
            if over and under:
                (t0, f0), (t1, f1) = max(over), min(under)
                if f1 > 0:
                    a = (math.log(target) - math.log(f0)) / (math.log(f1) - math.log(f0))
                    t = math.exp(math.log(t0) + min(max(a, 0.1), 0.9) * (math.log(t1) - math.log(t0)))
                else:
                    t = math.sqrt(t0 * t1)
            elif over:
                t *= min(max(f / target, 2.0), 16.0)
            else:
                t /= min(max(target / max(f, 1e-9), 2.0), 16.0)
        if abs(best.outlier_fraction - target) > 0.2 * target:
            log.warning("SpQR: outlier fraction %.4f%% after %d passes, target %.4f%% (threshold %.3g)",
                        100 * best.outlier_fraction, len(tried), 100 * target, best.threshold)
        best.passes = len(tried)
        return best

    def _pass(self, W0: torch.Tensor, Hinv: torch.Tensor, bits: int, group_size: int, sym: bool, stat_bits: int,
              stat_group: int, tau: float, block_size: int, mse: bool) -> SpQRResult:
        """One GPTQ pass over W0 [N, K] (processing order) with SpQR statistics and outliers above tau."""
        maxq = 2**bits - 1
        W = W0.clone()
        n, k = W.shape
        gs = k if group_size == -1 else group_size
        diag = torch.diag(Hinv)
        Q = torch.zeros_like(W)
        codes = torch.zeros_like(W)
        mask = torch.zeros_like(W, dtype=torch.bool)
        resid = torch.zeros_like(W)
        losses = torch.zeros(n, device=W.device)
        stats: list[tuple[torch.Tensor, ...]] = []
        s = z = None
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            W1 = W[:, i1:i2].clone()  # (N, B), updated in place below
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if col % gs == 0:
                    group = torch.cat([W1[:, i:i + gs], W[:, i2:i2 + gs]], 1)[:, :gs]  # (N, g) updated weights
                    s, z, st = self._group_stats(group, diag[col:col + group.shape[1]], bits, sym, stat_bits,
                                                 stat_group, tau, mse)
                    stats.append(st)
                w, d = W1[:, i], Hinv1[i, i]
                q = torch.clamp(torch.round(w / s + z), 0, maxq)
                deq = s * (q - z)  # what the layer's dense part computes, (q - z) * s
                r = torch.zeros_like(w)
                if math.isfinite(tau):
                    out = ((w - deq) / d).square() > tau
                    r = torch.where(out, (w - deq).half().float(), r)
                    mask[:, col], resid[:, col] = out, r
                rec = deq + r
                codes[:, col], Q[:, col] = q, rec
                err = (w - rec) / d
                losses += err.pow(2) / 2
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the remaining columns
        sc, ss, sb, zc, zs, zb = (torch.stack(t) for t in zip(*stats))  # (G, N) codes, (G, N/stat_group) pairs
        return SpQRResult(codes=codes, scales=None, zeros=None, g_idx=torch.arange(k, device=W.device) // gs,
                          error=float(losses.sum()), scales_code=sc, scales_step=ss, scales_base=sb, zeros_code=zc,
                          zeros_step=zs, zeros_base=zb, outlier_mask=mask, outlier_residual=resid.half(), recon=Q,
                          stat_bits=stat_bits)

    @staticmethod
    def _descend(res: SpQRResult, W: torch.Tensor, Hd: torch.Tensor, bits: int, block_size: int,
                 passes: int) -> None:
        """`passes` coordinate-descent passes on `res` in the processing order (before `_unpermute`), in place:
        codes [N, K], recon [N, K] and the outliers' residuals [N, K]; W [N, K] the target, Hd [K, K] damped.
        The statistics stay fixed, so they are decoded once for all passes."""
        S = decode_scales(res.scales_code, res.scales_step, res.scales_base).float()  # (G, N), as the pass decoded
        Z = decode_stats(res.zeros_code, res.zeros_step, res.zeros_base)  # (G, N) float zeros
        resid = res.outlier_residual.float()  # (N, K), fp16 values: exact through the passes
        codes, g = res.codes.t(), res.g_idx.long()  # (K, N) view: descend writes res.codes
        for _ in range(passes):
            descend(W, Hd, res.recon, codes, S, Z, g, 2**bits - 1, block_size, free=res.outlier_mask, resid=resid)
        res.outlier_residual = resid.half()

    @staticmethod
    def _group_stats(group: torch.Tensor, d: torch.Tensor, bits: int, sym: bool, stat_bits: int, stat_group: int,
                     tau: float, mse: bool):
        """Scale and zero [N] of one group (fitted without its likely outliers), quantized at stat_bits:
        (decoded scale fp32, decoded zero fp32, (scale codes, step, base, zero codes, step, base))."""
        fit = group
        if math.isfinite(tau) and group.shape[1] > 1:
            likely = leave_one_out_gain(group, d, bits, sym) > tau
            keep = (~likely).float()
            mean = (group * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
            fit = torch.where(likely, mean, group)
        scale, zero = find_params(fit, bits, sym, mse)
        sc, ss, sb = quantize_stats(scale[None], stat_bits, stat_group)
        zc, zs, zb = quantize_stats(zero[None], stat_bits, stat_group)
        s = decode_scales(sc, ss, sb)[0].float()
        z = decode_stats(zc, zs, zb)[0]
        return s, z, (sc[0], ss[0], sb[0], zc[0], zs[0], zb[0])

    @staticmethod
    def _unpermute(res: SpQRResult, perm: torch.Tensor | None) -> SpQRResult:
        """Columns back to the original input order; codes to the layout's [K, N]."""
        if perm is not None:
            inv = torch.argsort(perm)
            res.codes, res.recon = res.codes[:, inv], res.recon[:, inv]
            res.outlier_mask, res.outlier_residual = res.outlier_mask[:, inv], res.outlier_residual[:, inv]
            res.g_idx = res.g_idx[inv]
        res.codes = res.codes.t().to(torch.int32).contiguous()
        res.g_idx = res.g_idx.to(torch.int32)
        return res
