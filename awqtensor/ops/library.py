"""The ``awqtensor::`` custom ops. Each has a typed schema and a fake implementation, so
``torch.compile(fullgraph=True)`` traces through them; device kernels register here.

    int4_linear(x [..., K], qweight, scales [N, G], zeros [N, G]?, act_scale [K]?, bias [N]?,
                group_size, packing_format) -> [..., N] in x.dtype
    w4a8_linear(the same) -> the same, with int8 dynamic activations for large M (``w4a8.py``)
    dequantize(qweight, scales, zeros?, act_scale?, group_size, in_features, packing_format)
                -> [N, in_features] in scales.dtype
    int4_grouped_linear(x [M, K], rows [P], block_experts [P / BLOCK_M], qweight [E, K/8, N],
                scales [E, N, G], zeros?, act_scale [E, K]?, group_size) -> [P, N] in x.dtype
                (mixtures of experts, stacked "triton" layout; ``awqtensor/ops/triton_moe.py``)
    decode_attention(query [B, H, 1, D], key [B, KVH, L, D], value [B, KVH, L, D], mask?,
                scale) -> [B, 1, H, D] in query.dtype
                (one new token per row over a KV cache; ``awqtensor/generation.py``)

Every CPU and Python implementation checks its arguments against each other before a
tensor reaches a kernel (x's last dimension against the weight's groups, qweight's dtype
and bytes in its layout, the shapes of scales, zeros, act_scale and bias, group_size,
dtypes): a ValueError naming the argument, what was expected and what came
(``reference.check_linear_args``; the C++ op's ``check_linear`` in cpu_op.cpp). NaN and
inf in x propagate as through ``F.linear(x, dequantize(...), bias)`` on every CPU route.

They are declared with ``torch.library.Library`` (schema, then a kernel per dispatch key)
rather than the ``custom_op`` decorator: the decorator's Python wrapper costs about 6 us
a call, as much as the whole CPU kernel on a SmolLM2-sized layer at decode. Neither op
has an autograd kernel: ``F.linear`` on an Int4AWQTensor takes an autograd.Function
when a gradient is wanted (``awqtensor/tensor.py``). Devices with no kernel of their own
get the Python dispatcher by layout, which ends in the pure-torch reference.
"""

from __future__ import annotations

import torch

from . import cpu, gpu, reference, w4a8

_lib = torch.library.Library("awqtensor", "DEF")

_lib.define(
    "int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? act_scale, Tensor? bias, "
    "int group_size, str packing_format) -> Tensor"
)
# The Python dispatcher by layout (awqtensor/ops/cpu.py) serves the CPU, and any device
# without a kernel, until the C++ CPU kernel (cpu_op.cpp) loads with the first CPU weight;
# that one hands layouts other than "cpu_blocks" back to it as _int4_linear_py.
_lib.impl("int4_linear", cpu.int4_linear, "CompositeExplicitAutograd")
_lib.impl("int4_linear", gpu.int4_linear, "CUDA")
_lib.define(
    "_int4_linear_py(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? act_scale, Tensor? bias, "
    "int group_size, str packing_format) -> Tensor"
)
_lib.impl("_int4_linear_py", cpu.int4_linear, "CompositeExplicitAutograd")


# W4A8 (int8 dynamic activations, ``w4a8.py``): the same arguments; the op decides per call,
# by M = numel / K, between the W4A8 GEMM and weight-only (int4_linear). The C++ CPU
# kernel takes the CPU when it loads and hands other layouts back as _w4a8_linear_py.
_lib.define(
    "w4a8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? act_scale, Tensor? bias, "
    "int group_size, str packing_format) -> Tensor"
)
_lib.impl("w4a8_linear", w4a8.w4a8_linear, "CompositeExplicitAutograd")
_lib.define(
    "_w4a8_linear_py(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? act_scale, Tensor? bias, "
    "int group_size, str packing_format) -> Tensor"
)
_lib.impl("_w4a8_linear_py", w4a8.w4a8_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("awqtensor::int4_linear", lib=_lib)
@torch.library.register_fake("awqtensor::_int4_linear_py", lib=_lib)
@torch.library.register_fake("awqtensor::w4a8_linear", lib=_lib)
@torch.library.register_fake("awqtensor::_w4a8_linear_py", lib=_lib)
def _(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


_lib.define(
    "dequantize(Tensor qweight, Tensor scales, Tensor? zeros, Tensor? act_scale, int group_size, "
    "int in_features, str packing_format) -> Tensor"
)
# By layout: "cpu_blocks" the CPU kernel, "triton" Triton's (interpreted on the CPU), else
# the reference. The C++ CPU kernel (cpu_op.cpp) takes over the CPU when it loads (an
# embedding lookup in an 8-bit head dequantizes a row per decoded token: ~100 us through
# Python) and hands other layouts back as _dequantize_py.
_lib.impl("dequantize", cpu.dequantize, "CompositeExplicitAutograd")
_lib.impl("dequantize", gpu.dequantize, "CUDA")
_lib.define(
    "_dequantize_py(Tensor qweight, Tensor scales, Tensor? zeros, Tensor? act_scale, int group_size, "
    "int in_features, str packing_format) -> Tensor"
)
_lib.impl("_dequantize_py", cpu.dequantize, "CompositeExplicitAutograd")


@torch.library.register_fake("awqtensor::dequantize", lib=_lib)
@torch.library.register_fake("awqtensor::_dequantize_py", lib=_lib)
def _(qweight, scales, zeros, act_scale, group_size, in_features, packing_format):
    return scales.new_empty((scales.shape[0], in_features))


_lib.define(
    "int4_grouped_linear(Tensor x, Tensor rows, Tensor block_experts, Tensor qweight, Tensor scales, "
    "Tensor? zeros, Tensor? act_scale, int group_size) -> Tensor"
)
_lib.impl("int4_grouped_linear", gpu.int4_grouped_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("awqtensor::int4_grouped_linear", lib=_lib)
def _(x, rows, block_experts, qweight, scales, zeros, act_scale, group_size):
    return x.new_empty((rows.shape[0], scales.shape[1]))


_lib.define("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor")
# The C++ CPU kernel (cpu_op.cpp) registers for the CPU when it loads; elsewhere, torch ops.
_lib.impl("decode_attention", reference.decode_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("awqtensor::decode_attention", lib=_lib)
def _(query, key, value, mask, scale):
    b, h, _, d = query.shape
    return query.new_empty((b, 1, h, d))
