"""Error-feedback rounding (GPTQ) for one Linear, in the same group-wise int4 format.

Round-to-nearest rounds every weight on its own. GPTQ rounds the columns of W [N, K] one
by one and spreads each column's rounding error over the columns not yet rounded,
weighted by the inverse of the input second-moment matrix H = XᵀX (+ dampening), so the
Linear's output on the calibration inputs moves as little as possible. On top of AWQ,
W is the scaled and clipped weight and X its input (x / s).

The format does not change: scales and zeros are fixed per (row, group) from W's range
before any rounding (static groups) and the columns are rounded in their natural order
(no act-order permutation), so the result is plain asymmetric (or symmetric) int4 with
one scale and zero per group, as AutoAWQ's GEMM checkpoints, GGUF's Q4_1 and vLLM read it.
"""

from __future__ import annotations

import torch

from .. import quant

DAMP = 0.01  # GPTQ's default: H += DAMP * mean(diag(H)) * I
BLOCK = 128  # columns per lazy update (GPTQ's default)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)⁻¹, with the dampening
    raised tenfold up to three times when H is not positive definite; None if it never is."""
    mean = h.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(h.shape[0])
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(h + damp * (10 ** attempt) * mean * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    return None


def gptq_codes(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               damp: float = DAMP, block: int = BLOCK) -> torch.Tensor | None:
    """uint8 codes [N, n_groups * group_size] of ``w`` [N, K] rounded with GPTQ's error
    feedback under ``h`` [K, K] (Σ xᵀx), with the given per-(row, group) ``scales`` and
    ``zeros`` (None: symmetric, zero point 8) held fixed. Padded columns hold the zero,
    as ``quant.quantize`` writes them. None when H stays singular whatever the dampening
    (the caller rounds to nearest instead)."""
    n, k = w.shape
    w = w.float().clone()
    h = h.float().clone()
    dead = h.diagonal() == 0  # inputs never seen: nothing to compensate there
    h[dead, dead] = 1.0
    hinv = _inverse_cholesky(h, damp)
    if hinv is None:
        return None
    s = scales.float()
    z = torch.full_like(s, quant.SYMMETRIC_ZERO) if zeros is None else zeros.float()
    low, high = (0, 15) if zeros is not None else (quant.SYMMETRIC_ZERO - 8, quant.SYMMETRIC_ZERO + 7)
    codes = torch.empty(n, k)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1, err1, h1 = w[:, start:end].clone(), torch.empty(n, end - start), hinv[start:end, start:end]
        for i in range(end - start):
            g = (start + i) // group_size
            column = w1[:, i]
            q = torch.clamp(torch.round(column / s[:, g]) + z[:, g], low, high)
            codes[:, start + i] = q
            e = (column - (q - z[:, g]) * s[:, g]) / h1[i, i]
            w1[:, i:].sub_(e.unsqueeze(1) * h1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, end:].sub_(err1 @ hinv[start:end, end:])
    padded = quant.n_groups(k, group_size) * group_size
    out = torch.empty(n, padded, dtype=torch.uint8)
    out[:, :k] = codes.to(torch.uint8)
    if padded > k:
        out[:, k:] = z[:, -1:].to(torch.uint8)
    return out
