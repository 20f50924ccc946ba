"""Triton implementations of the ops, for weights in the ``"triton"`` layout: the CUDA
kernels, and the CPU ones when ``AWQTENSOR_BACKEND=triton`` runs them under
``TRITON_INTERPRET=1``.

The dispatcher picks by M (rows of the input), each candidate saying why it cannot
serve a call (``reasons``):

* ``gemv``: M <= GEMV_MAX_M. Reads each weight tile once per row of x; no tensor cores,
  none needed when the weight's bytes are the cost.
* ``gemm``: M <= GEMM_MAX_M. Tiles through ``tl.dot``, dequantizing in the main loop.
* ``dequantize_matmul``: dequantize once, then the dense matmul (cuBLAS). Always applicable.

``AWQTENSOR_DISABLE=gemv,gemm`` turns kernels off (``triton`` turns the layout off, see
``awqtensor.packing``). The thresholds and the launch configurations come from
``tuning``: measured per device and Triton version when ``AWQTENSOR_AUTOTUNE=1``,
cached as JSON, defaults otherwise; nothing is tuned at import.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import packing
from . import reference, tuning

KERNELS = ("gemv", "gemm", "dequantize_matmul")


def _disabled() -> set[str]:
    return set(os.environ.get("AWQTENSOR_DISABLE", "").split(","))


def reasons(m: int, device: torch.device) -> dict[str, str | None]:
    """For each kernel, why it cannot serve an M-row call on ``device`` (None: it can)."""
    limits = tuning.thresholds(device)
    why = {
        "gemv": f"M={m} > GEMV_MAX_M={limits['gemv_max_m']}" if m > limits["gemv_max_m"] else None,
        "gemm": f"M={m} > GEMM_MAX_M={limits['gemm_max_m']}" if m > limits["gemm_max_m"] else None,
        "dequantize_matmul": None,
    }
    for kernel in _disabled() & set(why):
        why[kernel] = f"disabled by AWQTENSOR_DISABLE={kernel}"
    return why


def choose(m: int, device: torch.device) -> str:
    why = reasons(m, device)
    return next((k for k in KERNELS if why[k] is None), "dequantize_matmul")


def _runnable(t: torch.Tensor) -> bool:
    from .triton_kernels import interpreting

    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


def int4_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format):
    if packing_format != packing.TRITON or not _runnable(x):
        return reference.int4_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format)
    from . import triton_kernels

    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], scales.shape[0]
    kernel = choose(m, x.device)
    if kernel == "dequantize_matmul":
        w = triton_kernels.dequantize(qweight, scales, zeros, None, group_size, k, x.dtype)
        y = F.linear(x2 if act_scale is None else x2 * act_scale, w, bias)
    else:
        launch = getattr(triton_kernels, kernel)

        def run(config):
            return launch(x2, qweight, scales, zeros, act_scale, bias, group_size, **config)

        y = run(tuning.config(kernel, m, n, k, group_size, x.dtype, x.device, run))
    return y.reshape(*lead, n)


def dequantize(qweight, scales, zeros, act_scale, group_size, in_features, packing_format):
    if packing_format != packing.TRITON or not _runnable(qweight):
        return reference.dequantize(qweight, scales, zeros, act_scale, group_size, in_features, packing_format)
    from . import triton_kernels

    return triton_kernels.dequantize(qweight, scales, zeros, act_scale, group_size, in_features, scales.dtype)


def int4_grouped_linear(x, rows, block_experts, qweight, scales, zeros, act_scale, group_size):
    if not _runnable(x):
        return reference.int4_grouped_linear(x, rows, block_experts, qweight, scales, zeros, act_scale, group_size)
    from . import triton_moe

    return triton_moe.grouped_gemm(x.contiguous(), rows, block_experts, qweight, scales, zeros, act_scale,
                                   group_size, block_m=rows.numel() // max(block_experts.numel(), 1))


def w4a8_linear(x, qweight, scales, zeros, act_scale, bias, group_size):
    """The Triton W4A8 GEMM (``triton_w4a8.py``) on a "triton"-layout weight; the switch
    that sends a call here is ``w4a8.reasons``."""
    from . import triton_w4a8, w4a8

    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if act_scale is not None:
        x2 = x2 * act_scale
    xq, d = w4a8.quantize_activations(x2, group_size, scales.shape[1])
    y = triton_w4a8.w4a8_gemm(xq, d, qweight, scales, zeros, bias, group_size, x.dtype)
    return y.reshape(*lead, scales.shape[0])
