"""Pure-torch implementations of the ops: the portable fallback and the readable spec,
with the ops' argument contract (``check_linear_args``, ``check_weight_args``), which
every Python path checks before a tensor reaches a kernel (the C++ op checks the same,
cpu_op.cpp).

Tests compare these and every kernel against their own float64 reference, not against
this file."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import packing, quant

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- the ops' arguments ----
# int4_linear(x [..., K], qweight, scales [N, G], zeros [N, G] uint8?, act_scale [K]?,
# bias [N]?, group_size, packing_format): G = ceil(K / group_size), qweight as its layout
# holds an [N, G * group_size] weight (``packing.qweight_layout``). Every refusal is a ValueError
# that names the argument, what was expected and what came.

def _refuse(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _described(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"{t.dtype} of shape {list(t.shape)} on {t.device}"


def check_layout(op: str, qweight, n: int, n_groups: int, group_size, in_features: int, in_name: str,
                 packing_format: str) -> None:
    """group_size, ``in_features`` against the weight's groups, and qweight's dtype and
    shape in its layout."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        _refuse(op, f"group_size must be a positive number of columns, got {group_size!r}")
    if in_features < 1 or n_groups != -(-in_features // group_size):
        _refuse(op, f"{in_name} = {in_features} does not fit the weight's {n_groups} groups of {group_size} "
                    f"columns (scales.shape[1]): expected {(n_groups - 1) * group_size + 1} to "
                    f"{n_groups * group_size} columns, i.e. ceil({in_name} / group_size) = G")
    shape, dtype = packing.qweight_layout(packing_format, n, n_groups, group_size)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != dtype or tuple(qweight.shape) != shape:
        _refuse(op, f"qweight must be {dtype} of shape {list(shape)} (the {packing_format!r} layout of an "
                    f"[N={n}, {n_groups} x {group_size}] weight), got {_described(qweight)}")


def check_vector(op: str, name: str, t, size: int, size_name: str) -> None:
    """``t`` (None allowed) a 1-D float tensor of ``size`` elements."""
    if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != size
                          or not t.dtype.is_floating_point):
        _refuse(op, f"{name} must be a 1-D float tensor of {size_name} = {size} elements, got {_described(t)}")


def check_x(op: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        _refuse(op, f"x must be a float32, bfloat16 or float16 tensor of [..., in_features], got {_described(x)}")


def check_weight_args(op: str, qweight, scales, zeros, act_scale, group_size, in_features: int,
                      packing_format: str, in_name: str = "in_features") -> int:
    """The weight's tensors against ``in_features`` (dequantize's, or x's last dimension);
    returns N."""
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or not scales.dtype.is_floating_point:
        _refuse(op, f"scales must be a 2-D [N, G] float tensor, got {_described(scales)}")
    n, n_groups = scales.shape
    check_layout(op, qweight, n, n_groups, group_size, in_features, in_name, packing_format)
    if zeros is not None and (not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8
                              or tuple(zeros.shape) != (n, n_groups)):
        _refuse(op, f"zeros must be uint8 [N, G] = {[n, n_groups]} like scales, got {_described(zeros)}")
    check_vector(op, "act_scale", act_scale, in_features, in_name)
    return n


def check_linear_args(op: str, x, qweight, scales, zeros, act_scale, bias, group_size, packing_format) -> None:
    """int4_linear's and w4a8_linear's arguments (see above)."""
    check_x(op, x)
    n = check_weight_args(op, qweight, scales, zeros, act_scale, group_size, x.shape[-1], packing_format,
                          "x.shape[-1]")
    check_vector(op, "bias", bias, n, "N (scales.shape[0])")


def check_decode_attention_args(op: str, query, key, value, mask) -> None:
    """query [B, H, 1, D], key and value [B, KVH, L, D] (H a multiple of KVH), float; mask
    bool or float, broadcastable to [B, H, 1, >= L] (the C++ kernel also wants it 3-D or 4-D)."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in tensors):
        _refuse(op, f"query, key and value must be float tensors, got {', '.join(_described(t) for t in tensors)}")
    if (query.dim() != 4 or query.shape[2] != 1 or key.dim() != 4 or value.shape != key.shape
            or key.shape[0] != query.shape[0] or key.shape[3] != query.shape[3] or key.shape[1] < 1
            or query.shape[1] % key.shape[1]):
        _refuse(op, f"query [B, H, 1, D] and key, value [B, KVH, L, D] with H a multiple of KVH, got "
                    f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() not in (1, 2, 3, 4)
                             or not (mask.dtype == torch.bool or mask.dtype.is_floating_point)
                             or mask.shape[-1] < key.shape[2]):
        _refuse(op, f"mask must be bool (True = attend) or float (additive), broadcastable to "
                    f"[B, H, 1, >= L={key.shape[2]}], got {_described(mask)}")


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
    check_decode_attention_args("awqtensor::decode_attention", query, key, value, mask)
    b, heads, _, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    grouped = query.reshape(b, kv_heads, heads // kv_heads, d)  # the query heads that share a kv head
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale
    if mask is not None:  # per head: [b, kv_heads, group, keys]
        mask = mask[..., -1:, :length].expand(b, heads, 1, length).reshape(b, kv_heads, heads // kv_heads, length)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # [b, kv_heads, group, d]
    return out.reshape(b, 1, heads, d)
