"""CPU implementations of the ops.

``cpu_int4pack`` weights (bf16, see ``awqtensor.packing``) run through torch's int4 CPU
kernel; everything else dequantizes into the activation dtype and calls the dense matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import packing, quant
from . import reference


def _scale_and_zero(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """torch's kernel computes (q - 8) * scale + offset; ours is (q - zero) * scale, so
    offset = (8 - zero) * scale. Returns [n_groups, N, 2] as the kernel wants."""
    s = scales.float()
    offset = torch.zeros_like(s) if zeros is None else (quant.SYMMETRIC_ZERO - zeros.float()) * s
    return torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous().to(scales.dtype)


def int4_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format):
    if packing_format != packing.CPU_INT4PACK:
        return reference.int4_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format)
    if x.dtype != torch.bfloat16:
        raise TypeError(f"a {packing_format} weight takes bfloat16 input, got {x.dtype}")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if act_scale is not None:
        x2 = x2 * act_scale
    k_padded = scales.shape[1] * group_size
    if k_padded > k:
        x2 = F.pad(x2, (0, k_padded - k))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2.contiguous(), qweight, group_size, _scale_and_zero(scales, zeros)
    )
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, -1)
