"""CPU implementations of the ops.

A weight lands on the CPU in the layout of the best kernel that can serve it
(``packing.choose_packing``): awqtensor's own kernel (``"cpu_blocks"``, ``cpu_kernel.py``)
whenever it builds, else torch's int4 kernel, else the canonical layout. For the
``cpu_blocks`` layout:

* ``cpu_blocks``: awqtensor's kernel, int8 activations x int4 weights. Every M, dtype and
  group size; several times faster than the dense fp32 matmul at decode (``benchmarks/cpu_linear.py``).
  (The C++ op sends large calls on CPUs with native bf16 matmuls to a dequantize + bf16
  matmul route instead, see ``cpu_kernel.dense_unsuitable``; this Python path is the
  ctypes build's, and has only the kernel.)
* otherwise (disabled after the weight was packed) the pure-torch reference.

For the ``cpu_int4pack`` layout, two candidates, tried in order; each says why it cannot serve a call:

* ``cpu_int4pack_mm``: torch's int4 CPU kernel on a ``cpu_int4pack`` weight. With bf16
  activations it beats everything here at every M measured (1..128); with fp32/fp16 its
  cost grows linearly with M and dequantize-then-matmul wins from M = 3 on
  (``benchmarks/cpu_linear.py``).
* ``dequantize_matmul``: dequantize into the activation dtype, then the dense matmul.
  Always applicable.

Weights in the ``"triton"`` layout (``AWQTENSOR_BACKEND=triton``) go to ``ops.gpu``.

``AWQTENSOR_DISABLE=cpu_int4pack_mm`` turns the first off (and stops weights being packed
for it, see ``awqtensor.packing``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import packing, quant
from . import cpu_kernel, gpu, reference

# Smallest M from which dequantize + dense matmul beats torch's int4 kernel, per dtype.
DEQUANTIZE_FROM_M = {torch.float32: 3, torch.float16: 3}


def int4pack_unsuitable(x: torch.Tensor, packing_format: str) -> str | None:
    """Why ``cpu_int4pack_mm`` should not run this call, or None."""
    if packing_format != packing.CPU_INT4PACK:
        return f"the weight is in the {packing_format!r} layout"
    m = x.numel() // x.shape[-1]
    limit = DEQUANTIZE_FROM_M.get(x.dtype)
    if limit is not None and m >= limit:
        return f"M={m} >= {limit}: dequantize + dense matmul is faster with {x.dtype}"
    return None


def _scale_and_zero(scales: torch.Tensor, zeros: torch.Tensor | None, repeat: int) -> torch.Tensor:
    """torch's kernel computes (q - 8) * scale + offset; ours is (q - zero) * scale, so
    offset = (8 - zero) * scale. Returns [n_groups * repeat, N, 2] as the kernel wants.
    This is O(N * n_groups), a few percent of the weight's bytes."""
    s = scales.float()
    offset = torch.zeros_like(s) if zeros is None else (quant.SYMMETRIC_ZERO - zeros.float()) * s
    pairs = torch.stack((s, offset), dim=-1).transpose(0, 1)
    if repeat > 1:
        pairs = pairs.repeat_interleave(repeat, dim=0)
    return pairs.contiguous().to(scales.dtype)


def _int4pack_mm(x, qweight, scales, zeros, act_scale, bias, group_size):
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x_rows = x.reshape(-1, k)
    if act_scale is not None:
        x2 = x2 * act_scale
    k_padded = scales.shape[1] * group_size
    if k_padded > k:
        x2 = F.pad(x2, (0, k_padded - k))
    kernel_group = packing.cpu_int4pack_group_size(group_size)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2.contiguous(), qweight, kernel_group, _scale_and_zero(scales, zeros, group_size // kernel_group)
    )
    if bias is not None:
        y = y + bias
    # NaN and inf: torch's kernel rebuilds a weight that q == zero makes 0 as (q - 8) * scale
    # + (8 - zero) * scale, a rounding residue, so inf * w gives +-inf where F.linear on the
    # weight gives NaN. Rows of x holding NaN or inf (their outputs are never all finite)
    # are computed again by the reference; one sum tells whether there are any.
    if not math.isfinite(y.sum()):
        bad = ~torch.isfinite(x_rows).all(-1)
        if bad.any():
            y[bad] = reference.int4_linear(x_rows[bad], qweight, scales, zeros, act_scale, bias, group_size,
                                           packing.CPU_INT4PACK)
    return y.reshape(*lead, -1)


def dequantize(qweight, scales, zeros, act_scale, group_size, in_features, packing_format):
    """The dense weight: awqtensor's kernel for "cpu_blocks" in fp32/bf16, else the reference."""
    reference.check_weight_args("awqtensor::dequantize", qweight, scales, zeros, act_scale, group_size, in_features,
                                packing_format)
    if (packing_format == packing.CPU_BLOCKS and scales.dtype in (torch.float32, torch.bfloat16)
            and qweight.device.type == "cpu" and cpu_kernel.unavailable() is None):
        w = cpu_kernel.dequantize(qweight, scales.shape[1], group_size, (scales.shape[0], in_features), scales.dtype,
                                  check=False)
        return w if act_scale is None else (w * act_scale).to(scales.dtype)
    return gpu.dequantize(qweight, scales, zeros, act_scale, group_size, in_features, packing_format)


def int4_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format):
    reference.check_linear_args("awqtensor::int4_linear", x, qweight, scales, zeros, act_scale, bias, group_size,
                                packing_format)
    if packing_format == packing.CPU_BLOCKS and x.device.type == "cpu" and cpu_kernel.unavailable() is None:
        return cpu_kernel.linear(x, qweight, scales.shape[1], group_size, act_scale, bias, scales.shape[0],
                                 check=False)
    if packing_format == packing.TRITON:  # AWQTENSOR_BACKEND=triton: the Triton kernels, interpreted
        return gpu.int4_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format)
    if int4pack_unsuitable(x, packing_format) is None:
        return _int4pack_mm(x, qweight, scales, zeros, act_scale, bias, group_size)
    return reference.int4_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format)
