"""Pure-torch implementations of the ops: the portable fallback and the readable spec.

Tests compare these and every kernel against their own float64 reference, not against
this file."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import packing, quant


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    group_size: int,
    in_features: int,
    packing_format: str,
) -> torch.Tensor:
    """The float weight [N, in_features] this quantized weight stands for, in scales.dtype:
    ``(q - zero) * scale``, times ``act_scale`` per input channel when there is one."""
    q = packing.codes(qweight, scales.shape[1] * group_size, packing_format, scales.shape[1])
    w = quant.dequantize(q, scales, zeros, group_size, in_features, dtype=torch.float32)
    if act_scale is not None:
        w = w * act_scale.float()
    return w.to(scales.dtype).contiguous()


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    packing_format: str,
) -> torch.Tensor:
    """``x @ dequantize(...).T + bias`` with the dequantized weight in x.dtype."""
    k = x.shape[-1]
    if act_scale is not None:
        x = x * act_scale
    q = packing.codes(qweight, scales.shape[1] * group_size, packing_format, scales.shape[1])
    w = quant.dequantize(q, scales, zeros, group_size, k, dtype=x.dtype)
    return F.linear(x, w, bias)


def int4_grouped_linear(x, rows, block_experts, qweight, scales, zeros, act_scale, group_size):
    """[P, N]: position p holds ``x[rows[p]]`` times its tile's expert's weight (stacked
    ``"triton"`` layout, [E, ...]); zeros where ``rows[p] < 0``."""
    block_m = rows.numel() // max(block_experts.numel(), 1)
    y = x.new_zeros((rows.numel(), scales.shape[1]))
    for tile, expert in enumerate(block_experts.tolist()):
        at = torch.arange(tile * block_m, (tile + 1) * block_m, device=rows.device)
        at = at[rows[at] >= 0]
        if at.numel():
            e = lambda t: None if t is None else t[expert]  # noqa: E731
            y[at] = int4_linear(x[rows[at].long()], qweight[expert], scales[expert], e(zeros), e(act_scale), None,
                                group_size, packing.TRITON)
    return y


def decode_attention(query, key, value, mask, scale):
    """Attention of one new token per row: query [B, H, 1, D] over key/value [B, KVH, L, D]
    (H a multiple of KVH, grouped-query), ``mask`` broadcastable to [B, H, 1, >= L] (its last
    query row is used), bool (True = attend) or additive; -> [B, 1, H, D], query's dtype.
    Scores and softmax in fp32."""
    b, heads, _, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    grouped = query.reshape(b, kv_heads, heads // kv_heads, d)  # the query heads that share a kv head
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale
    if mask is not None:  # per head: [b, kv_heads, group, keys]
        mask = mask[..., -1:, :length].expand(b, heads, 1, length).reshape(b, kv_heads, heads // kv_heads, length)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # [b, kv_heads, group, d]
    return out.reshape(b, 1, heads, d)
