"""Tier 1: the quantization formula and the packings, bit-exact."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from awqtensor import Int4AWQTensor, packing, quant
from conftest import DTYPES

shapes = st.tuples(st.integers(1, 48), st.integers(1, 300))
group_sizes = st.sampled_from([32, 64, 128, -1])


def random_weight(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # rows with different ranges and an offset, so zero points spread over 0..15
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3 + torch.randn(n, 1, generator=g)
    return w.to(dtype)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, length_odd=st.booleans(), seed=st.integers(0, 2**31))
def test_pack_unpack_roundtrip(shape, length_odd, seed):
    n, k = shape
    k += length_odd
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = packing.pack_nibbles(q)
    assert packed.shape == (n, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(packing.unpack_nibbles(packed, k), q)
    assert np.array_equal(reference.unpack_bytes(packed, k), q.numpy())


@settings(max_examples=25, deadline=None)
@given(n16=st.integers(1, 6), groups=st.integers(1, 5), group_size=st.sampled_from([32, 64, 128, 256]),
       seed=st.integers(0, 2**31))
def test_cpu_int4pack_repack_roundtrip(n16, groups, group_size, seed):
    n, k = 16 * n16, groups * group_size
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    plain = packing.pack_nibbles(q)
    native = packing.repack(plain, k, packing.PLAIN, packing.CPU_INT4PACK)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    assert torch.equal(native, expected)
    assert torch.equal(packing.repack(native, k, packing.CPU_INT4PACK, packing.PLAIN), plain)


@settings(max_examples=80, deadline=None)
@given(shape=shapes, group_size=group_sizes, zero_point=st.booleans(), seed=st.integers(0, 2**31))
def test_fp32_codes_match_autoawq_formula(shape, group_size, zero_point, seed):
    n, k = shape
    w = random_weight(n, k, torch.float32, seed)
    t = Int4AWQTensor.from_float(w, group_size, zero_point)
    gs = k if group_size == -1 else group_size
    codes, scales, zeros = reference.autoawq_quantize(w.double().numpy(), gs, zero_point)
    plain = t.plain_qweight()
    ours = reference.unpack_bytes(plain, k)
    np.testing.assert_allclose(t.scales.double().numpy(), scales, rtol=1e-6)
    if zero_point:
        # zeros and codes are rounded values: float32 vs float64 can only differ at exact ties
        assert np.mean(t.zeros.numpy() == zeros) > 0.99
    assert np.abs(ours - codes).max() <= 1 and np.mean(ours == codes) > 0.995
    # padded columns dequantize to exactly zero
    full = reference.unpack_bytes(plain, t.k_padded)
    if t.k_padded > k:
        pad_zero = t.zeros[:, -1:].numpy() if zero_point else 8
        assert np.all(full[:, k:] == pad_zero)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zero_point", [True, False])
def test_error_within_half_step(dtype, group_size, zero_point):
    w = random_weight(40, 200, dtype, seed=group_size + 7 * zero_point)
    t = Int4AWQTensor.from_float(w, group_size, zero_point)
    assert t.dtype == dtype and t.shape == w.shape
    dq = reference.dequantize(t)
    wd = w.double().numpy()
    step = t.scales.double().numpy().repeat(t.group_size, axis=1)[:, : w.shape[1]]
    # A group whose range holds 0 is represented within half a step (plus the scale's
    # rounding to the storage dtype). One that does not gets its zero point clamped and
    # clips, exactly as AutoAWQ's formula does (checked in the fp32 formula test).
    straddles = np.ones_like(wd, dtype=bool)
    if zero_point:
        for cols in reference.group_slices(w.shape[1], t.group_size):
            straddles[:, cols] = (wd[:, cols].min(1, keepdims=True) <= 0) & (wd[:, cols].max(1, keepdims=True) >= 0)
    err = np.abs(dq - wd)
    slack = 0.5 + 16 * torch.finfo(dtype).eps
    assert straddles.mean() > 0.5
    assert np.all(err[straddles] <= (step * slack)[straddles] + 1e-6 * np.abs(wd).max())
    atol = 2 * torch.finfo(dtype).eps * float(np.abs(dq).max())
    assert torch.allclose(t.dequantize().double(), torch.from_numpy(dq), rtol=0, atol=atol)


def test_symmetric_codes_use_zero_eight():
    w = random_weight(16, 64, torch.float32, seed=3)
    t = Int4AWQTensor.from_float(w, 32, zero_point=False)
    assert t.zeros is None
    codes = reference.unpack_bytes(t.plain_qweight(), 64)
    assert codes.min() >= 0 and codes.max() <= 15
    # the largest |w| of each group maps to -7 or +7 around 8
    assert set(np.unique(np.abs(codes - 8).max(axis=1))) == {7}


def test_short_last_group_range_ignores_padding():
    w = random_weight(8, 70, torch.float32, seed=5)  # groups of 64: one full, one of 6 columns
    scales, zeros = quant.choose_qparams(w, 64, True)
    tail = w[:, 64:]
    expected = (tail.amax(1) - tail.amin(1)).clamp(min=1e-5) / 15
    torch.testing.assert_close(scales[:, 1], expected, rtol=1e-6, atol=0)
