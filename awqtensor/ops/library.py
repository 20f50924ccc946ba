"""The ``awqtensor::`` custom ops. Each has typed arguments and a fake implementation,
so ``torch.compile(fullgraph=True)`` traces through them; device kernels register here.

    int4_linear(x [..., K], qweight, scales [N, G], zeros [N, G]?, act_scale [K]?, bias [N]?,
                group_size, packing_format) -> [..., N] in x.dtype
    dequantize(qweight, scales, zeros?, act_scale?, group_size, in_features, packing_format)
                -> [N, in_features] in scales.dtype
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu, gpu, reference


@torch.library.custom_op("awqtensor::int4_linear", mutates_args=())
def int4_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    act_scale: Optional[Tensor],
    bias: Optional[Tensor],
    group_size: int,
    packing_format: str,
) -> Tensor:
    return reference.int4_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


int4_linear.register_kernel("cpu")(cpu.int4_linear)
int4_linear.register_kernel("cuda")(gpu.int4_linear)


@torch.library.custom_op("awqtensor::dequantize", mutates_args=())
def dequantize(
    qweight: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    act_scale: Optional[Tensor],
    group_size: int,
    in_features: int,
    packing_format: str,
) -> Tensor:
    return reference.dequantize(qweight, scales, zeros, act_scale, group_size, in_features, packing_format)


@dequantize.register_fake
def _(qweight, scales, zeros, act_scale, group_size, in_features, packing_format):
    return scales.new_empty((scales.shape[0], in_features))


dequantize.register_kernel("cpu")(gpu.dequantize)  # the Triton layout under the interpreter; else reference
dequantize.register_kernel("cuda")(gpu.dequantize)
