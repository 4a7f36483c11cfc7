"""GPTQ for one linear layer (Frantar et al. 2022), with the add_batch / quantize protocol.

    g = GPTQ(layer.weight)            # W [N, K]
    for x in calibration_inputs:      # x (..., K): what the layer sees
        g.add_batch(x)
    result = g.quantize(bits=4, group_size=128, desc_act=True)
"""

from __future__ import annotations

import logging
import math

import torch

from gptqlora.quant.quantizer import QuantResult, dequant, find_params, quantize

REFIT_BYTES = 256 << 20  # refit_scales: the (rows, G, G) normal equations solved at a time

log = logging.getLogger(__name__)


class GPTQ:
    needs_inputs = True  # accumulates the layer's inputs (add_batch) before quantize

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()  # (N, K)
        self.columns = weight.shape[1]
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=weight.device)
        self.nsamples = 0  # rows (tokens) seen
        self.D: torch.Tensor | None = None  # (K, K): (2/n) sum (x_fp - x) x^T, asymmetric calibration only

    def add_batch(self, inp: torch.Tensor, fp_inp: torch.Tensor | None = None) -> None:
        """Accumulate H = (2/n) * sum over tokens of x x^T, in fp32, as a running mean.

        `fp_inp`: what the layer sees in the full-precision model on the same tokens (asymmetric
        calibration, GPTAQ): then also D = (2/n) sum (x_fp - x) x^T, so that `quantize(gptaq=1)` targets
        the fp layer's output W x_fp instead of W x."""
        x = inp.detach().reshape(-1, self.columns).to(self.H.device, torch.float32)  # (T, K)
        t = x.shape[0]
        scale = self.nsamples / (self.nsamples + t)
        self.H *= scale
        self.nsamples += t
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x.t() @ x
        if fp_inp is not None:
            xf = fp_inp.detach().reshape(-1, self.columns).to(self.H.device, torch.float32)
            xf = math.sqrt(2 / self.nsamples) * xf
            if self.D is None:
                self.D = torch.zeros_like(self.H)
            self.D *= scale
            self.D += (xf - x).t() @ x

    def _inverse_cholesky(self, H: torch.Tensor, damp: float) -> torch.Tensor:
        """Upper Cholesky factor of `damped(H, damp)`^-1, raising damp until it exists."""
        d = damp
        while True:
            try:
                L = torch.linalg.cholesky(damped(H, d))
                hinv = torch.cholesky_inverse(L)
                return torch.linalg.cholesky(hinv, upper=True)
            except torch.linalg.LinAlgError:
                if d >= 1.0:
                    raise RuntimeError(f"GPTQ: Hessian not positive definite even with damp={d:.2f}; "
                                       f"use more (or more varied) calibration data") from None
                d = round(d + 0.01, 4)
                log.warning("GPTQ: Cholesky failed, raising damp to %.2f", d)

    @torch.no_grad()
    def quantize(self, bits: int, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                 static_groups: bool = False, damp: float = 0.01, block_size: int = 128,
                 mse: bool = False, min_zero: int = 0, group_aware: bool = False,
                 mse_select: bool = False, gptaq: float = 0.0, refit: bool = False,
                 refit_rounds: int = 0, descent_passes: int = 0) -> QuantResult:
        """`group_aware` (without desc_act, with groups): group-aware reordering (GAR, Gafni et al. 2025),
        groups in decreasing order of their largest Hessian diagonal, columns in each group by decreasing
        diagonal; groups stay contiguous, so g_idx stays trivial and every loader reads the result.

        `mse_select` (with `mse`): solve twice, with and without the MSE range search, and keep the result
        with the lower calibration output error (`output_error`); costs a second GPTQ pass.

        `gptaq` (alpha, needs `add_batch(x, fp_inp=...)`): asymmetric calibration (GPTAQ, Li et al. 2025):
        the target is alpha * W x_fp + (1 - alpha) * W x. Solved exactly by first moving W to the
        least-squares target W' = W (I + alpha D H^-1) (damped H), then running GPTQ on W' with H.

        `refit`: the group scales refitted to the chosen codes by least squares on the calibration output
        error (`refit_scales`); codes and zeros unchanged.

        `refit_rounds` (with `refit`): alternate codes and scales. The refitted scales no longer match the
        codes GPTQ chose for the old ones, so each round re-runs the GPTQ sweep with the refitted scales and
        zeros held fixed (only the codes re-chosen, with error feedback, as with static groups), then refits
        again; a round is kept only if it lowers the calibration output error, else the rounds stop.

        `descent_passes`: after the above, passes of exact coordinate descent on the codes (`descend_codes`,
        as QuantEase, Behdin et al. 2023), the scales and zeros fixed, each pass followed by a refit where
        `refit` is on. The descent minimises the error under H damped as for GPTQ's solve (`damp`): with the
        undamped H it lowered the calibration error more but widened the 3-bit perplexity gaps (tiny 0.0016
        -> 0.0030, man-page v2 0.0317 -> 0.0334, seed 0), with the damped one it did not."""
        if self.nsamples == 0:
            raise RuntimeError("GPTQ.quantize() called before any add_batch()")
        H, self.H = self.H, None  # free as we go
        D, self.D = self.D, None
        W = self.weight.to(H.device, torch.float32).clone()  # (N, K)
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        if gptaq and D is not None:
            W = asymmetric_target(W, H, D, gptaq, damp, dead)
        kw = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups,
                  damp=damp, block_size=block_size, min_zero=min_zero, group_aware=group_aware)
        if not (mse and mse_select or refit or descent_passes):
            return self._solve(W, H, mse=mse, **kw)
        best = None
        for m in (True, False) if mse and mse_select else (mse,):
            res = self._solve(W.clone(), H.clone(), mse=m, **kw)
            if refit:
                res = refit_scales(res, W, H)
            res.output_error = output_error(W, res.dequantize(), H)
            for _ in range(refit_rounds if refit else 0):
                again = refit_scales(self._solve(W.clone(), H.clone(), mse=m, fixed=res, **kw), W, H)
                again.output_error = output_error(W, again.dequantize(), H)
                log.debug("refit round: output error %.6g -> %.6g", res.output_error, again.output_error)
                if again.output_error >= res.output_error:
                    break
                res = again
            Hd = damped(H, damp) if descent_passes else None
            for _ in range(descent_passes):
                res = descend_codes(res, W, Hd, 2**bits - 1)
                res = refit_scales(res, W, H) if refit else res
                res.output_error = output_error(W, res.dequantize(), H)
            if best is None or res.output_error < best.output_error:
                best = res
        return best

    def _solve(self, W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool,
               static_groups: bool, damp: float, block_size: int, mse: bool, min_zero: int,
               group_aware: bool, fixed: QuantResult | None = None) -> QuantResult:
        """One GPTQ pass over W [N, K] with Hessian H (both consumed). `fixed`: an earlier result of the same
        shape whose scales, zeros and g_idx are kept; only the codes are chosen (`refit_rounds`)."""
        maxq = 2**bits - 1
        n, k = W.shape
        gs = k if group_size == -1 else group_size

        static = None
        if fixed is None and static_groups and group_size != -1:  # parameters from the original (unupdated) weights
            static = [find_params(W[:, s:s + gs], bits, sym, mse, min_zero) for s in range(0, k, gs)]

        perm = group_order = None
        if desc_act:
            perm = torch.argsort(torch.diag(H), descending=True)
        elif group_aware and group_size != -1 and k % gs == 0:
            diag = torch.diag(H).reshape(-1, gs)  # (G, gs)
            group_order = torch.argsort(diag.max(1).values, descending=True)  # (G,)
            local = torch.argsort(diag, dim=1, descending=True) + torch.arange(0, k, gs, device=H.device)[:, None]
            perm = local[group_order].reshape(-1)  # (K,): groups contiguous, in the new order
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        if fixed is not None:  # each processed column's group, and the groups' parameters
            fixed_g = fixed.g_idx.long() if perm is None else fixed.g_idx.long()[perm]  # (K,)
            fixed_s, fixed_z = fixed.scales.float(), fixed.zeros.float()  # (G, N)
        Hinv = self._inverse_cholesky(H, damp)
        del H

        Q = torch.zeros_like(W)
        losses = torch.zeros(n, device=W.device)
        scales, zeros = [], []
        scale = zero = None
        if group_size == -1 and fixed is None:
            scale, zero = find_params(W, bits, sym, mse, min_zero)
            scales.append(scale)
            zeros.append(zero)

        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            W1 = W[:, i1:i2].clone()  # (N, B), updated in place below
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if fixed is not None:
                    scale, zero = fixed_s[fixed_g[col]], fixed_z[fixed_g[col]]
                elif group_size != -1:
                    if static is not None:
                        scale, zero = static[(int(perm[col]) if perm is not None else col) // gs]
                    elif col % gs == 0:  # group params from the already-updated weights
                        upcoming = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs]
                        scale, zero = find_params(upcoming, bits, sym, mse, min_zero)
                        scales.append(scale)
                        zeros.append(zero)
                w, d = W1[:, i], Hinv1[i, i]
                q = quantize(w, scale, zero, maxq)
                Q[:, col] = q
                err = (w - dequant(q, scale, zero)) / d
                losses += err.pow(2) / 2
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the remaining columns

        if fixed is not None:
            Q = Q if perm is None else Q[:, torch.argsort(perm)]
            return QuantResult(codes=Q.t().to(torch.int32).contiguous(), scales=fixed.scales, zeros=fixed.zeros,
                               g_idx=fixed.g_idx, error=float(losses.sum()))
        if static is not None:
            scales, zeros = [s for s, _ in static], [z for _, z in static]
        elif group_order is not None:  # back to the groups' own order
            back = torch.argsort(group_order).tolist()
            scales, zeros = [scales[i] for i in back], [zeros[i] for i in back]
        g_idx = torch.arange(k, device=W.device) // gs
        if perm is not None:
            invperm = torch.argsort(perm)
            Q = Q[:, invperm]
            if static is None and group_order is None:  # act-order groups follow the processing order
                g_idx = g_idx[invperm]
        return QuantResult(
            codes=Q.t().to(torch.int32).contiguous(),
            scales=torch.stack(scales).half(),
            zeros=torch.stack(zeros).to(torch.int32),
            g_idx=g_idx.to(torch.int32),
            error=float(losses.sum()),
        )


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I (K, K), GPTQ's dampening (before its Cholesky)."""
    return H + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, alpha: float, damp: float,
                      dead: torch.Tensor) -> torch.Tensor:
    """GPTAQ's least-squares target W' = W (I + alpha D H^-1) (damped H) for W [N, K]: quantizing W' with H
    then aims at alpha * W x_fp + (1 - alpha) * W x (see `GPTQ.quantize`)."""
    W = W + alpha * torch.linalg.solve(damped(H, damp), (W @ D).t()).t()  # W + alpha W D Hd^-1 (Hd symmetric)
    W[:, dead] = 0
    return W


def refit_scales(res: QuantResult, W: torch.Tensor, H: torch.Tensor) -> QuantResult:
    """The group scales refitted to the codes GPTQ chose: per output row n, the scales s (G) minimise the
    calibration output error (W_n - Ŵ_n) H (W_n - Ŵ_n)ᵀ with Ŵ_n[k] = s[g(k)] (q[k, n] - z[g(k), n]), codes
    and zeros fixed (the stored format is unchanged: fp16 scales). GPTQ fits each group's range before the
    error feedback has moved the weights that follow, and with act-order a group's columns are spread over
    all of K, so the cross-group terms of H matter: a group-by-group refit (H's diagonal blocks only) gained a
    tenth of this on the tiny model. A least-squares problem of G unknowns per row, solved exactly; a row keeps
    its old scales where the fp16 result is not better. Cost: N K^2 (one pass like W H), memory N K plus
    REFIT_BYTES for the rows' normal equations at a time.
    W [N, K] (the target GPTQ quantized: GPTAQ's shifted one where on), H [K, K] undamped, both in the
    original column order, as `res`."""
    n, k = W.shape
    g = res.g_idx.long()  # (K,)
    ng = res.scales.shape[0]
    d = res.codes.t().float() - res.zeros.float()[g].t()  # (N, K): Ŵ = s_g(k) * d
    E = torch.nn.functional.one_hot(g, ng).to(W.dtype)  # (K, G)
    members = [(g == h).nonzero().squeeze(1) for h in range(ng)]
    eye = torch.eye(ng, dtype=W.dtype, device=W.device)
    s = torch.empty(n, ng, dtype=W.dtype, device=W.device)
    rows = max(1, REFIT_BYTES // (4 * ng * ng))  # rows solved at a time: (rows, G, G) stays ~256 MB (65B, g64: G = 344)
    for a in range(0, n, rows):
        dn = d[a:a + rows]  # (n', K)
        r = ((W[a:a + rows] @ H) * dn) @ E  # (n', G): Aᵀ H W_n per row
        M = torch.zeros(dn.shape[0], ng, ng, dtype=W.dtype, device=W.device)  # (n', G, G): Aᵀ H A per row
        for h, cols in enumerate(members):
            if cols.numel():
                M[:, :, h] = ((dn[:, cols] @ H[cols]) * dn) @ E  # row n: Σ_{k, l in h} d_k H_kl d_l pooled by g(k)
        diag = M.diagonal(dim1=1, dim2=2)
        M = M + (1e-6 * diag.mean(-1).clamp_min(1e-12))[:, None, None] * eye + (diag == 0).to(W.dtype)[:, None, :] * eye
        s[a:a + rows] = torch.linalg.solve(M, r.unsqueeze(-1)).squeeze(-1)
    new = s.t().to(torch.float16)  # (G, N)
    # keep whichever is better per row (fp16 rounding; a group a row never uses keeps its old scale)
    better = row_errors(W, d * new.float()[g].t(), H) < row_errors(W, d * res.scales.float()[g].t(), H)
    scales = torch.where(better[None, :], new, res.scales)
    return QuantResult(codes=res.codes, scales=scales, zeros=res.zeros, g_idx=res.g_idx, error=res.error)


def descend_codes(res: QuantResult, W: torch.Tensor, H: torch.Tensor, maxq: int,
                  block_size: int = 128) -> QuantResult:
    """One pass of exact coordinate descent on the codes, scales and zeros fixed: column by column, the code
    that minimises the calibration output error tr((W - Ŵ) H (W - Ŵ)ᵀ) given every other column is the grid
    point nearest to Ŵ_j + (E H)_j / H_jj (E = W - Ŵ; a scalar quadratic per row), so the error never rises.
    GPTQ chooses each code once, against weights its later choices still move, and the refit then changes the
    scales under those codes; this re-chooses them all against the final scales (QuantEase, Behdin et al. 2023).
    The pass itself is `descend`. W [N, K], H [K, K] (`quantize` passes GPTQ's damped one)."""
    codes = res.codes.clone()  # (K, N), re-chosen in place
    descend(W, H, res.dequantize(), codes, res.scales.float(), res.zeros, res.g_idx.long(), maxq, block_size)
    return QuantResult(codes=codes, scales=res.scales, zeros=res.zeros, g_idx=res.g_idx, error=res.error)


def descend(W: torch.Tensor, H: torch.Tensor, Wq: torch.Tensor, codes: torch.Tensor, S: torch.Tensor,
            Z: torch.Tensor, g: torch.Tensor, maxq: int, block_size: int = 128,
            free: torch.Tensor | None = None, resid: torch.Tensor | None = None) -> None:
    """One pass of exact coordinate descent (see `descend_codes`), in place on Wq [N, K] (the reconstruction,
    Ŵ_nk = S[g_k, n] (codes[k, n] - Z[g_k, n]) where not free) and codes [K, N] (any dtype; may be a transposed
    view). S, Z [G, N] the decoded scales and zeros, g [K] each column's group. Integer zeros (GPTQ): a code is
    round(t / s) + z; float zeros (SpQR's decoded statistics): round(t / s + z), as each solver's own pass.

    `free` [N, K] bool with `resid` [N, K] fp32 holding fp16 values (SpQR's outliers): at those positions
    Ŵ = grid + resid, the residual stored in fp16, so the value is not bound to the grid: it takes the exact
    optimum t = Ŵ_j + (E H)_j / H_jj as the nearest grid point plus fp16(t - grid point) — kept only where
    that is at least as close to t as the old value (fp16 rounding), so the error still never rises.

    E H is kept current lazily, as GPTQ does: within a block of columns by rank-1 updates, for the columns after
    it by one matmul (the columns before it are not read again in this pass). Cost N K^2 per pass; memory two
    N x K fp32 (Ŵ and E H) besides W and H."""
    k = W.shape[1]
    float_zeros = Z.is_floating_point()
    Z = Z.float()
    EH = (W - Wq) @ H  # (N, K): current for the block in hand and those after it
    d = torch.diag(H)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        old = Wq[:, i1:i2].clone()  # (N, B)
        for j in range(i1, i2):
            s, z = S[g[j]], Z[g[j]]  # (N,)
            t = Wq[:, j] + EH[:, j] / d[j]  # (N,): each row's exact optimum for column j
            qj = torch.clamp(torch.round(t / s + z) if float_zeros else torch.round(t / s) + z, 0, maxq)  # (N,)
            new = s * (qj - z)
            if free is not None:
                f = free[:, j]  # (N,)
                r = (t - new).half().float()
                take = f & ((new + r - t).abs() <= (Wq[:, j] - t).abs())  # free and not worse than before
                keep = f & ~take
                new = torch.where(take, new + r, torch.where(keep, Wq[:, j], new))
                qj = torch.where(keep, codes[j].to(qj.dtype), qj)
                resid[:, j] = torch.where(take, r, resid[:, j])
            EH[:, i1:i2] += (Wq[:, j] - new)[:, None] * H[j, i1:i2][None, :]  # E_j grows by old minus new
            Wq[:, j], codes[j] = new, qj.to(codes.dtype)
        EH[:, i2:] += (old - Wq[:, i1:i2]) @ H[i1:i2, i2:]  # later blocks: this block's changes at once


def row_errors(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Each output row's calibration error of Q against W [N, K]: diag((W - Q) H (W - Q)^T), (N,)."""
    E = W - Q
    return ((E @ H) * E).sum(1)


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """The calibration output error of Q against W [N, K]: tr((W - Q) H (W - Q)^T), H = (2/n) X X^T, i.e.
    twice the mean over tokens of ||(W - Q) x||^2."""
    return float(row_errors(W, Q, H).sum())
