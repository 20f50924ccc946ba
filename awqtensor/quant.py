"""Group-wise int4 quantization in pure torch: choose parameters, quantize, dequantize.

The formula is AutoAWQ's (``pseudo_quantize_tensor``), so that checkpoints and
perplexities compare one to one:

* asymmetric (``zero_point=True``), per (output row, group)::

      scale = (max - min).clamp(min=1e-5) / 15
      zero  = clamp(-round(min / scale), 0, 15)
      q     = clamp(round(w / scale) + zero, 0, 15)
      w    ~= (q - zero) * scale

* symmetric (``zero_point=False``)::

      scale = max(|w|).clamp(min=1e-5) / 7
      q     = clamp(round(w / scale), -8, 7) + 8      (stored unsigned)
      w    ~= (q - 8) * scale

Where we differ from AutoAWQ: statistics are taken in fp32 whatever the weight dtype,
and ``zero`` and ``q`` are computed from the scale *after* it is rounded to the storage
dtype, so the stored triple reproduces the weight as closely as the storage allows.
For fp32 weights the result is identical to AutoAWQ's.

Padding: when ``in_features`` is not a multiple of ``group_size`` the last group is
short. Its range (min/max) covers only its real columns; the padded columns hold
``q = zero`` (8 when symmetric) and dequantize to exactly 0. Padded length is
``n_groups * group_size``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SYMMETRIC_ZERO = 8  # the implicit zero point of symmetric int4, stored unsigned


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, n_groups, group_size] in fp32; a short last group is padded by
    repeating its last real column, which leaves its min and max unchanged."""
    n, k = w.shape
    pad = n_groups(k, group_size) * group_size - k
    w = w.float()
    if pad:
        w = F.pad(w.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return w.reshape(n, -1, group_size)


def choose_qparams(
    w: torch.Tensor, group_size: int, zero_point: bool, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-(row, group) ``scales`` [N, n_groups] in ``scale_dtype`` (default: w.dtype) and
    ``zeros`` [N, n_groups] uint8, or None when symmetric."""
    g = _grouped(w, group_size)
    scale_dtype = scale_dtype or w.dtype
    if zero_point:
        hi, lo = g.amax(dim=-1), g.amin(dim=-1)
        scales = ((hi - lo).clamp(min=1e-5) / 15).to(scale_dtype)
        zeros = (-torch.round(lo / scales.float())).clamp(0, 15).to(torch.uint8)
        return scales, zeros
    scales = (g.abs().amax(dim=-1).clamp(min=1e-5) / 7).to(scale_dtype)
    return scales, None


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Integer codes 0..15 as uint8 [N, n_groups * group_size]; padded columns hold the zero."""
    n, k = w.shape
    g = _grouped(w, group_size)
    s = scales.float().unsqueeze(-1)
    if zeros is None:
        q = torch.clamp(torch.round(g / s), -8, 7) + SYMMETRIC_ZERO
    else:
        z = zeros.float().unsqueeze(-1)
        q = torch.clamp(torch.round(g / s) + z, 0, 15)
    q = q.reshape(n, -1).to(torch.uint8)
    if q.shape[1] > k:
        pad_value = zeros if zeros is not None else torch.full_like(scales, SYMMETRIC_ZERO, dtype=torch.uint8)
        q[:, k:] = pad_value[:, -1:]
    return q


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(q - zero) * scale, computed in fp32, returned as [N, in_features] in ``dtype``
    (default: scales.dtype)."""
    n = q.shape[0]
    g = q[:, : scales.shape[1] * group_size].reshape(n, -1, group_size).float()
    z = SYMMETRIC_ZERO if zeros is None else zeros.float().unsqueeze(-1)
    w = (g - z) * scales.float().unsqueeze(-1)
    return w.reshape(n, -1)[:, :in_features].to(dtype or scales.dtype)



def fake_quantize_groups(
    g: torch.Tensor, zero_point: bool, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize fp32 groups ``g`` [..., group_size] in one pass (calibration's
    inner loop). ``lo``/``hi`` [..., 1] override the range (clipping); for symmetric
    quantization only ``hi`` is used, as the largest magnitude."""
    if zero_point:
        hi = g.amax(dim=-1, keepdim=True) if hi is None else hi
        lo = g.amin(dim=-1, keepdim=True) if lo is None else lo
        scale = (hi - lo).clamp(min=1e-5) / 15
        zero = (-torch.round(lo / scale)).clamp(0, 15)
        return (torch.clamp(torch.round(g / scale) + zero, 0, 15) - zero) * scale
    hi = g.abs().amax(dim=-1, keepdim=True) if hi is None else hi
    scale = hi.clamp(min=1e-5) / 7
    return torch.clamp(torch.round(g / scale), -8, 7) * scale


def fake_quantize(w: torch.Tensor, group_size: int, zero_point: bool) -> torch.Tensor:
    """What the stored int4 weight will dequantize to, as fp32 [N, K]; equals
    ``dequantize(quantize(w, *choose_qparams(w)))`` for fp32 ``w``."""
    n, k = w.shape
    group_size = k if group_size == -1 else group_size
    return fake_quantize_groups(_grouped(w, group_size), zero_point).reshape(n, -1)[:, :k]
