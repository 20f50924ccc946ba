"""The two searches: a shared per-input-channel scale for a group of Linears, and a
per-(output row, group) clipping range for each Linear.

Both score candidates by an output error, never by the weight error:

* ``search_scale`` takes a ``loss(scales)`` callable. The one-call path passes the MSE
  of the smallest module that holds the group (attention, MLP, or the lone Linear) run
  on the captured inputs, after screening the grid by ``moment_loss``; the
  prepare/convert path passes ``moment_loss`` itself: the Linears' own output error from
  running second moments.
* ``search_clip`` needs only the second moments of the Linear's input within each
  group, ``X_g^T X_g``: the error of a group's partial output is ``e Σ_g e^T`` exactly.
  That uses every calibration token, where AutoAWQ subsamples 512.
"""

from __future__ import annotations

import math

import torch

from .. import quant

ROW_CHUNK = 1024  # output rows per step of the clipping search: bounds its memory


def weight_profile(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's w_mean [K]: |w| normalised by its group's max, averaged over all rows
    of all Linears in the group."""
    w = torch.cat([w.float() for w in weights])
    k = w.shape[1]
    g = quant._grouped(w, k if group_size == -1 else group_size)
    g = g.abs() / g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return g.reshape(w.shape[0], -1)[:, :k].mean(0)


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int, duo_scaling):
    """(label, s) pairs: identity first (plain RTN), then the ratio grid of the chosen
    families: duo ``x^r / w^(1-r)`` and/or x-only ``x^r``, r = i / n_grid."""
    yield "identity", torch.ones_like(x_mean)
    families = {True: ("duo",), False: ("x",), "both": ("duo", "x")}[duo_scaling]
    x_mean = x_mean.clamp(min=1e-8)
    for family in families:
        for i in range(n_grid):
            r = i / n_grid
            if family == "x" and i == 0:
                continue  # x^0 is the identity, already tried
            s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4) if family == "duo" else x_mean.pow(r)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            yield f"{family} r={r:.2f}", s


def search_scale(loss_fn, x_mean, w_mean, n_grid, duo_scaling, screen_fn=None, finalists: int = 0):
    """(best scale, best label, loss of the identity, best loss). With ``screen_fn``, every
    candidate is first scored by it and only the identity and the ``finalists`` best go
    to ``loss_fn``. Candidates with a non-finite loss are never chosen; if none is
    finite the identity is returned."""
    candidates = list(scale_candidates(x_mean, w_mean, n_grid, duo_scaling))
    if screen_fn is not None and finalists and len(candidates) > finalists + 1:
        screened = sorted(candidates[1:], key=lambda c: _finite_or_inf(screen_fn(c[1])))
        candidates = candidates[:1] + screened[:finalists]
    best = (torch.ones_like(x_mean), "identity", math.inf)
    identity_loss = math.inf
    for label, s in candidates:
        loss = loss_fn(s)
        if label == "identity":
            identity_loss = loss
        if math.isfinite(loss) and loss < best[2]:
            best = (s, label, loss)
    return best[0], best[1], identity_loss, best[2]


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def scaled_grams(grams: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-group second moments of ``x / s`` from those of ``x`` ([n_groups, gs, gs])."""
    n_groups, size = grams.shape[0], grams.shape[-1]
    s_pad = torch.nn.functional.pad(s, (0, n_groups * size - s.numel()), value=1.0).reshape(n_groups, size)
    return grams / (s_pad.unsqueeze(-1) * s_pad.unsqueeze(-2))


def moment_loss(weights: list[torch.Tensor], grams: torch.Tensor, s: torch.Tensor, group_size: int,
                zero_point: bool, fake_quantize=None) -> float:
    """Σ over the Linears of their output error with scale ``s``, ``Σ_g e_g Σ_g e_gᵀ`` in
    the scaled frame, from per-group second moments: every token counts, none is stored.
    Cross-group terms are left out (independent rounding errors average them away).
    ``fake_quantize(w)``: another format's weight quantization (default: int4)."""
    g, size, total = scaled_grams(grams, s), grams.shape[-1], 0.0
    fake_quantize = fake_quantize or (lambda ws: quant.fake_quantize(ws, group_size, zero_point))
    for w in weights:
        ws = w.float() * s
        e = quant._grouped(fake_quantize(ws) - ws, size)
        total += torch.einsum("ngi,gij,ngj->", e, g, e).item()
    return total


def group_grams(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum over tokens of x_g^T x_g per group: [n_groups, group_size, group_size]
    (columns past K are zero padding). ``x`` is [tokens, K]."""
    t, k = x.shape
    group_size = k if group_size == -1 else group_size
    pad = quant.n_groups(k, group_size) * group_size - k
    x = torch.nn.functional.pad(x.float(), (0, pad)).reshape(t, -1, group_size).transpose(0, 1)
    return x.transpose(1, 2) @ x


def search_clip(w: torch.Tensor, grams: torch.Tensor, group_size: int, zero_point: bool,
                max_shrink: float, n_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) range (lo, hi), each [N, n_groups, 1], minimising each group's
    output error ``e Σ_g e^T``. Shrink fractions tried: max_shrink * i / n_grid,
    i = 0..n_grid-1, first on both ends together (only on max|w| when symmetric); with a
    zero point, then on the top end alone and the bottom end alone, each from the best
    so far, since an asymmetric range's two ends need not clip alike."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g_all = quant._grouped(w, gs)  # padded columns: zero rows/cols in ``grams``, so they never count
    shrinks = [max_shrink * i / n_grid for i in range(n_grid)]
    los, his = [], []
    for rows in torch.arange(n).split(ROW_CHUNK):
        g = g_all[rows]
        hi0 = g.amax(dim=-1, keepdim=True) if zero_point else g.abs().amax(dim=-1, keepdim=True)
        lo0 = g.amin(dim=-1, keepdim=True)
        best = [torch.full(g.shape[:2] + (1,), math.inf), lo0, hi0]  # error, lo, hi

        def try_ranges(lo, hi):  # exactly what clip_weight + plain quantization will give
            clamped = torch.maximum(torch.minimum(g, hi), lo) if zero_point else torch.clamp(g, -hi, hi)
            e = quant.fake_quantize_groups(clamped, zero_point, lo, hi) - g
            err = torch.einsum("ngi,gij,ngj->ng", e, grams, e).unsqueeze(-1)
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better, lo, best[1])
            best[2] = torch.where(better, hi, best[2])

        for shrink in shrinks:
            try_ranges(lo0 * (1 - shrink), hi0 * (1 - shrink))
        if zero_point:
            lo_fixed = best[1]
            for shrink in shrinks:
                try_ranges(lo_fixed, hi0 * (1 - shrink))
            hi_fixed = best[2]
            for shrink in shrinks:
                try_ranges(lo0 * (1 - shrink), hi_fixed)
        los.append(best[1])
        his.append(best[2])
    return torch.cat(los), torch.cat(his)


def search_clip_with(w: torch.Tensor, grams: torch.Tensor, group_size: int, fake_quantize, max_shrink: float,
                     n_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``search_clip`` for another format that quantizes each group of ``group_size`` on its
    own (torchao's PerGroup configs): both ends of each (row, group) range shrink together,
    every shrink scored on the whole weight through ``fake_quantize(w)``; per (row, group)
    the best range (lo, hi), each [N, n_groups, 1]."""
    n, k = w.shape
    g = quant._grouped(w, group_size)
    hi0, lo0 = g.amax(dim=-1, keepdim=True), g.amin(dim=-1, keepdim=True)
    best = [torch.full(g.shape[:2] + (1,), math.inf), lo0, hi0]
    for i in range(n_grid):
        lo, hi = lo0 * (1 - max_shrink * i / n_grid), hi0 * (1 - max_shrink * i / n_grid)
        clamped = torch.maximum(torch.minimum(g, hi), lo).reshape(n, -1)[:, :k]
        e = quant._grouped(fake_quantize(clamped).float(), group_size) - g
        err = torch.einsum("ngi,gij,ngj->ng", e, grams, e).unsqueeze(-1)
        better = err < best[0]
        best = [torch.where(better, err, best[0]), torch.where(better, lo, best[1]), torch.where(better, hi, best[2])]
    return best[1], best[2]


def clip_weight(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int, zero_point: bool) -> torch.Tensor:
    """``w`` clamped per (row, group) to the searched range, [N, K] in w's dtype; its
    min/max then reproduce the range, so plain quantization applies the clipping."""
    n, k = w.shape
    g = quant._grouped(w, k if group_size == -1 else group_size)
    g = torch.clamp(g, -hi, hi) if not zero_point else torch.maximum(torch.minimum(g, hi), lo)
    return g.reshape(n, -1)[:, :k].to(w.dtype)
