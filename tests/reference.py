"""An independent float64 model of AutoAWQ's int4 format, written without the library's
code: element-wise arithmetic in numpy, explicit group slices, no bit operations."""

from __future__ import annotations

import numpy as np
import torch


def unpack_bytes(qweight: torch.Tensor, length: int) -> np.ndarray:
    """Canonical bytes [N, ceil(L/2)] -> codes [N, L]: column 2j is byte j mod 16, 2j+1 is byte j div 16."""
    b = qweight.numpy().astype(np.int64)
    codes = np.empty((b.shape[0], 2 * b.shape[1]), dtype=np.int64)
    codes[:, 0::2] = b % 16
    codes[:, 1::2] = b // 16
    return codes[:, :length]


def group_slices(k: int, group_size: int):
    return [slice(start, min(start + group_size, k)) for start in range(0, k, group_size)]


def dequantize(t, with_act_scale: bool = True) -> np.ndarray:
    """float64 [N, K] weight an Int4AWQTensor stands for, computed from its canonical fields
    (``with_act_scale=False``: without the per-input-channel activation scale folded in)."""

    n, k = t.shape
    plain = t.plain_qweight()
    codes = unpack_bytes(plain.cpu(), k)
    scales = t.scales.double().cpu().numpy()
    zeros = np.full(scales.shape, 8.0) if t.zeros is None else t.zeros.cpu().numpy().astype(np.float64)
    w = np.empty((n, k))
    for g, cols in enumerate(group_slices(k, t.group_size)):
        w[:, cols] = (codes[:, cols] - zeros[:, g : g + 1]) * scales[:, g : g + 1]
    if t.act_scale is not None and with_act_scale:
        w = w * t.act_scale.double().cpu().numpy()[None, :]
    return w


def autoawq_quantize(w: np.ndarray, group_size: int, zero_point: bool):
    """AutoAWQ's formula in float64: (codes [N, K], scales [N, G], zeros [N, G] or None)."""
    n, k = w.shape
    codes = np.empty((n, k), dtype=np.int64)
    scales, zeros = [], []
    for cols in group_slices(k, group_size):
        g = w[:, cols]
        if zero_point:
            s = np.maximum(g.max(1) - g.min(1), 1e-5) / 15
            z = np.clip(-np.round(g.min(1) / s), 0, 15)
            codes[:, cols] = np.clip(np.round(g / s[:, None]) + z[:, None], 0, 15)
            zeros.append(z)
        else:
            s = np.maximum(np.abs(g).max(1), 1e-5) / 7
            codes[:, cols] = np.clip(np.round(g / s[:, None]), -8, 7) + 8
        scales.append(s)
    return codes, np.stack(scales, 1), (np.stack(zeros, 1) if zero_point else None)


def linear(x: torch.Tensor, t, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 x @ W.T + bias."""
    w = torch.from_numpy(dequantize(t))
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def linear_as_computed(x: torch.Tensor, t, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 model of what ``F.linear(x, t, bias)`` computes in ``t``'s layout: the
    CPU kernel's W4A8 product for "cpu_blocks", the exact product otherwise."""
    return (q8_linear if t.packing_format == "cpu_blocks" else linear)(x, t, bias)


def q8_linear(x: torch.Tensor, t, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 model of the CPU kernel's W4A8 product: each row of ``x * act_scale`` is
    quantized per 32-column block of each group (the block ends at the group's or K's
    end) to int8 with scale absmax / 127, exactly as the kernel does it in float32; the
    products and sums are then taken in float64."""
    n, k = t.shape
    xs = x.float().numpy().astype(np.float32)
    if t.act_scale is not None:
        xs = xs * t.act_scale.float().numpy().astype(np.float32)[None, :]
    xq = np.empty(xs.shape, dtype=np.float64)  # the dequantized int8 activations
    for cols in group_slices(k, t.group_size):
        for start in range(cols.start, cols.stop, 32):
            block = xs[:, start : min(start + 32, cols.stop)]
            d = (np.abs(block).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
            inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
            xq[:, start : start + block.shape[1]] = np.rint(block * inv) * d.astype(np.float64)
    w = dequantize(t, with_act_scale=False)  # act_scale is already in the activations
    y = torch.from_numpy(xq @ w.T)
    return y if bias is None else y + bias.double()


def dense_route_linear(x: torch.Tensor, t, bias: torch.Tensor | None = None,
                       route: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float64 model of the CPU op's large-M route in ``route`` (bf16 or fp32): ``x *
    act_scale`` (an fp32 product) and the weight, each rounded to ``route``, then products
    and sums in float64. The route's fp32 sum and the rounding of its result are left to
    the caller's tolerance."""
    xs = x.float() * t.act_scale.to(x.dtype).float() if t.act_scale is not None else x.float()
    xb = xs.to(route).double()
    wb = torch.from_numpy(dequantize(t, with_act_scale=False)).float().to(route).double()
    y = xb @ wb.T
    return y if bias is None else y + bias.double()


def w4a8_linear(x: torch.Tensor, t, bias: torch.Tensor | None = None) -> np.ndarray:
    """float64 [M, N] of the W4A8 format: x (times act_scale, in fp32) quantized to int8 per
    row and weight group (d = absmax / 127 and x * (1 / d) rounded half to even, in fp32 as
    the format specifies), times the weight without act_scale, in float64."""
    n, k = t.shape
    xs = x.reshape(-1, k).float()
    if t.act_scale is not None:
        xs = xs * t.act_scale.float()
    xs = xs.numpy()
    xq = np.zeros(xs.shape)
    for cols in group_slices(k, t.group_size):
        g = xs[:, cols]
        d = (np.abs(g).max(1) / np.float32(127)).astype(np.float32)
        inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
        xq[:, cols] = np.round((g * inv[:, None]).astype(np.float32)).astype(np.float64) * d[:, None].astype(np.float64)
    y = xq @ dequantize(t, with_act_scale=False).T
    if bias is not None:
        y = y + bias.double().numpy()[None, :]
    return y
