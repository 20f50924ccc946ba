"""Tier 2: the awqtensor:: ops against an independent float64 reference, and opcheck."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import reference
from awqtensor import Int4AWQTensor, packing
from conftest import DTYPES, TOLERANCE, max_rel_err


def make_weight(n, k, dtype, group_size, zero_point=True, act_scale=False, seed=0, packing_format=None):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05 + 0.01 * torch.randn(n, 1, generator=g)).to(dtype)
    scale = (torch.rand(k, generator=g) + 0.5).to(dtype) if act_scale else None
    t = Int4AWQTensor.from_float(w, group_size, zero_point, act_scale=scale)
    if packing_format is not None and packing_format != t.packing_format:
        t = t._replace(qweight=packing.repack(t.qweight, t.k_padded, t.packing_format, packing_format,
                                              t.scales, t.zeros),
                       packing_format=packing_format)
    return t


CASES = [  # (N, K, group_size): K multiple and not multiple of the group, per channel
    (64, 128, 32), (48, 576, 64), (32, 576, 128), (80, 200, 64), (16, 96, -1), (24, 100, 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group_size", CASES)
@pytest.mark.parametrize("packing_format", [packing.PLAIN, packing.CPU_INT4PACK, packing.CPU_BLOCKS])
def test_linear_matches_float64_reference(dtype, n, k, group_size, packing_format):
    gs = k if group_size == -1 else group_size
    if packing_format == packing.CPU_INT4PACK and packing.cpu_int4pack_unsupported(n, gs, dtype):
        pytest.skip(packing.cpu_int4pack_unsupported(n, gs, dtype))
    t = make_weight(n, k, dtype, group_size, seed=n + k, packing_format=packing_format)
    assert t.packing_format == packing_format
    bias = torch.randn(n, dtype=dtype)
    for m in (1, 7, 33):
        x = torch.randn(m, k, dtype=dtype)
        for b in (None, bias):
            y = F.linear(x, t, b)
            assert y.dtype == dtype and y.shape == (m, n)
            assert max_rel_err(y, reference.linear_as_computed(x, t, b)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_point,act_scale", [(False, False), (True, True), (False, True)])
def test_symmetric_and_act_scale(dtype, zero_point, act_scale):
    t = make_weight(48, 192, dtype, 64, zero_point=zero_point, act_scale=act_scale, seed=11)
    x = torch.randn(3, 5, 192, dtype=dtype)  # 3-D input
    y = F.linear(x, t)
    assert y.shape == (3, 5, 48)
    expected = reference.linear_as_computed(x.reshape(-1, 192), t).reshape(3, 5, 48)
    assert max_rel_err(y, expected) < TOLERANCE[dtype]
    assert max_rel_err(t.dequantize(), torch.from_numpy(reference.dequantize(t))) < TOLERANCE[dtype]


def test_int4_linear_rows_are_batch_invariant():
    t = make_weight(64, 256, torch.float32, 64, seed=2)
    x = torch.randn(17, 256)
    full = F.linear(x, t)
    for i in (0, 8, 16):
        torch.testing.assert_close(F.linear(x[i : i + 1], t)[0], full[i], rtol=1e-5, atol=1e-6)


def _op_args(t, x, bias):
    return (x, t.qweight, t.scales, t.zeros, t.act_scale, bias, t.group_size, t.packing_format)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packing_format", [packing.PLAIN, packing.CPU_INT4PACK, packing.CPU_BLOCKS])
def test_opcheck(dtype, packing_format):
    for (n, k, gs), zero_point, act_scale, use_bias in itertools.product(
        [(32, 96, 32), (48, 576, 64)], [True, False], [False, True], [False, True]
    ):
        t = make_weight(n, k, dtype, gs, zero_point, act_scale, packing_format=packing_format)
        bias = torch.randn(n, dtype=dtype) if use_bias else None
        x = torch.randn(2, 3, k, dtype=dtype)
        torch.library.opcheck(torch.ops.awqtensor.int4_linear.default, _op_args(t, x, bias))
        torch.library.opcheck(
            torch.ops.awqtensor.dequantize.default,
            (t.qweight, t.scales, t.zeros, t.act_scale, t.group_size, k, t.packing_format),
        )
