"""awqtensor's CPU kernel ("cpu_blocks"): every instruction-set path this machine (or
qemu) runs, against a float64 model of its W4A8 arithmetic; the layout; the build and
its fallback; batch invariance; the accuracy cost of int8 activations."""

import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference
from awqtensor import Int4AWQTensor, packing
from awqtensor.ops import cpu_kernel
from conftest import DTYPES, TOLERANCE, max_rel_err

pytestmark = pytest.mark.skipif(cpu_kernel.unavailable() is not None,
                                reason=f"{cpu_kernel.unavailable()}")

ISAS = cpu_kernel.supported_isas() if cpu_kernel.unavailable() is None else []
# fp32: the kernel sums in fp32 (~1e-6); fp16/bf16: the output's rounding.
KERNEL_TOLERANCE = {torch.float32: 1e-5, torch.float16: TOLERANCE[torch.float16], torch.bfloat16: TOLERANCE[torch.bfloat16]}
# The same in units of the summed terms' magnitude (products_error): fp32 sums carry
# ~2e-7 of it (measured); fp16/bf16 outputs are rounded by up to 2^-11 / 2^-8 of
# themselves, so of the terms (measured 2e-4 / 2e-3).
TERMS_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 6e-3}

CASES = [  # (N, K, group_size): tile remainders (N % 8), odd and even blocks per group,
    (4, 64, 32), (7, 128, 64), (13, 576, 128), (40, 200, 64), (6, 100, -1), (9, 96, -1), (1, 130, 32),
]  # padded K, per-channel groups that are not a multiple of 32 (100 -> 4 blocks, 96 -> 3)


def weight(n, k, dtype, group_size, zero_point=True, act_scale=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05 + 0.02 * torch.randn(n, 1, generator=g)).to(dtype)
    s = (torch.rand(k, generator=g) + 0.5).to(dtype) if act_scale else None
    t = Int4AWQTensor.from_float(w, group_size, zero_point, act_scale=s)
    assert t.packing_format == packing.CPU_BLOCKS
    return t


def activations(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, ::17] *= 8  # outlier channels, as LLM activations have
    return x.to(dtype)


def bias_for(n, dtype, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def products_error(y, expected, x, t, bias=None) -> float:
    """max |y - expected| in units of |x * act_scale| @ |W|.T + |bias|, the size of the
    terms each output sums: unlike an error relative to max |expected|, it stays
    meaningful when an output nearly cancels (one output row whose bias cancels its dot
    product made the old measure fail at random)."""
    magnitude = x.double().abs() @ torch.from_numpy(np.abs(reference.dequantize(t))).T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return ((y.double() - expected.double()).abs() / magnitude.clamp_min(1e-30)).max().item()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("AWQTENSOR_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group_size", CASES)
def test_matches_float64_w4a8_model(isa, dtype, n, k, group_size):
    for zero_point, act_scale in ((True, False), (False, True), (True, True)):
        t = weight(n, k, dtype, group_size, zero_point, act_scale, seed=n * k)
        bias = bias_for(n, dtype, seed=n + k)
        for m in (1, 5):
            x = activations(m, k, dtype, seed=m + n)
            for b in (None, bias):
                y = F.linear(x, t, b)
                assert y.dtype == dtype and y.shape == (m, n)
                expected = reference.q8_linear(x, t, b)
                assert products_error(y, expected, x, t, b) < TERMS_TOLERANCE[dtype], (zero_point, act_scale)
                # the ctypes launcher (used where the torch binding cannot be built): same kernel, same bits
                direct = cpu_kernel.linear(x, t.qweight, t.scales.shape[1], t.group_size, t.act_scale, b, n)
                assert torch.equal(direct, y)


@pytest.mark.skipif(not {"avx2_vnni", "avx512_vnni"} <= set(ISAS), reason="needs AVX-VNNI and AVX512-VNNI")
@pytest.mark.parametrize("dtype", DTYPES)
def test_avx512_path_is_bit_identical_to_avx2_vnni(monkeypatch, dtype):
    # two weight rows per 512-bit register, each half doing the 256-bit path's arithmetic
    old = cpu_kernel.dense_route(None)  # the int8 kernel at every M
    try:
        for n, k, group_size in CASES + [(64, 576, 64), (33, 96, 96)]:
            t = weight(n, k, dtype, group_size, act_scale=True, seed=n + k)
            b = bias_for(n, dtype, seed=n)
            for m in (1, 2, 3, 5, 16):  # single rows and pairs of activation rows
                x = activations(m, k, dtype, seed=m * n)
                outputs = []
                for name in ("avx2_vnni", "avx512_vnni"):
                    monkeypatch.setenv("AWQTENSOR_CPU_ISA", name)
                    outputs.append(F.linear(x, t, b))
                assert torch.equal(*outputs), (n, k, group_size, m)
    finally:
        cpu_kernel.dense_route(**old)


def test_instruction_sets_agree(monkeypatch):
    t = weight(37, 320, torch.float32, 64, act_scale=True, seed=3)
    x = activations(6, 320, torch.float32, seed=4)
    outputs = {}
    for name in ISAS:
        monkeypatch.setenv("AWQTENSOR_CPU_ISA", name)
        outputs[name] = F.linear(x, t)
    assert "scalar" in outputs and len(outputs) >= 2 or len(ISAS) == 1
    for name, y in outputs.items():
        torch.testing.assert_close(y, outputs["scalar"], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("outliers,bound", [(False, 1e-2), (True, 3e-2)])
def test_int8_activations_cost(outliers, bound):
    """The accuracy effect of the int8 activations, against the exact int4 x fp32 product:
    relative Frobenius error about 0.6% on Gaussian activations, about 1% when every
    32-column block holds an 8x outlier channel (the step is set by the largest value)."""
    t = weight(256, 1024, torch.float32, 64, seed=5)
    x = activations(8, 1024, torch.float32, seed=6) if outliers else torch.randn(8, 1024)
    exact = reference.linear(x, t)
    err = (F.linear(x, t).double() - exact).norm() / exact.norm()
    assert 1e-4 < err < bound  # an approximation, and a close one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_batch_invariant_bitwise(dtype):
    t = weight(45, 256, dtype, 64, seed=7)
    x = activations(33, 256, dtype, seed=8)
    full = F.linear(x, t)
    for i in (0, 5, 32):
        assert torch.equal(F.linear(x[i : i + 1], t)[0], full[i])
    assert torch.equal(F.linear(x.reshape(3, 11, 256), t).reshape(33, 45), full)


def test_zero_and_empty_inputs():
    t = weight(8, 64, torch.float32, 32, seed=9)
    assert torch.equal(F.linear(torch.zeros(2, 64), t), torch.zeros(2, 8))
    assert F.linear(torch.zeros(0, 64), t).shape == (0, 8)


@pytest.mark.parametrize("n,k,group_size", CASES)
def test_layout_round_trip_and_header(n, k, group_size):
    t = weight(n, k, torch.bfloat16, group_size, seed=10)
    plain = t.plain_qweight()
    again = packing.repack(plain, t.k_padded, packing.PLAIN, packing.CPU_BLOCKS, t.scales, t.zeros)
    assert torch.equal(again, t.qweight)
    assert torch.equal(packing.repack(t.qweight, t.k_padded, packing.CPU_BLOCKS, packing.PLAIN, t.scales, t.zeros), plain)
    gs, g = t.group_size, t.scales.shape[1]
    header = t.qweight.reshape(n, g, -1)[:, :, :8].contiguous().view(torch.float32)
    assert torch.equal(header[..., 0], t.scales.float())
    assert torch.equal(header[..., 1], t.scales.float() * t.zeros.float())
    codes = reference.unpack_bytes(plain, t.k_padded)
    block = t.qweight.reshape(n, g, -1)[:, 0, 8:24].numpy().astype(np.int64)  # group 0, block 0
    width = min(32, gs)
    assert np.array_equal((block % 16)[:, : min(16, width)], codes[:, : min(16, width)])
    if width > 16:
        assert np.array_equal((block // 16)[:, : width - 16], codes[:, 16:width])


def test_moves_between_layouts():
    t = weight(24, 192, torch.float32, 64, seed=11)
    x = activations(3, 192, torch.float32, seed=12)
    bf16 = t.to(torch.bfloat16)
    assert bf16.packing_format == packing.CPU_BLOCKS
    assert torch.equal(bf16.plain_qweight(), t.plain_qweight())
    assert max_rel_err(F.linear(x.bfloat16(), bf16), reference.q8_linear(x.bfloat16(), bf16)) < KERNEL_TOLERANCE[torch.bfloat16]
    rows = t[8:16]
    assert rows.packing_format == packing.CPU_BLOCKS
    torch.testing.assert_close(F.linear(x, rows), F.linear(x, t)[:, 8:16], rtol=0, atol=0)


def test_compile_fullgraph():
    t = weight(32, 128, torch.float32, 64, seed=13)
    linear = torch.nn.Linear(128, 32, bias=True)
    linear.weight = torch.nn.Parameter(t, requires_grad=False)
    x = activations(4, 128, torch.float32, seed=14)
    compiled = torch.compile(linear, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), linear(x), rtol=1e-6, atol=1e-6)


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQTENSOR_CACHE", str(tmp_path))
    compiler = cpu_kernel._compiler()
    first = cpu_kernel._build(compiler)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel._build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert first.is_relative_to(tmp_path)


@pytest.mark.parametrize("broken", ["missing", "failing"])
def test_no_compiler_falls_back_with_one_warning(broken, tmp_path, monkeypatch):
    monkeypatch.setenv("AWQTENSOR_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_binding_loaded", [])  # as in a fresh process
    if broken == "missing":
        monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    else:
        monkeypatch.setattr(cpu_kernel, "_compiler", lambda: shutil.which("false"))
    cpu_kernel._load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = Int4AWQTensor.from_float(torch.randn(16, 64), 32)
            b = Int4AWQTensor.from_float(torch.randn(16, 64), 32)
        ours = [w for w in caught if "CPU kernel could not be built" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert a.packing_format == b.packing_format == packing.CPU_INT4PACK
        x = torch.randn(2, 64)
        assert max_rel_err(F.linear(x, a), reference.linear(x, a)) < TOLERANCE[torch.float32]
    finally:
        monkeypatch.undo()
        cpu_kernel._load.cache_clear()
    assert cpu_kernel.unavailable() is None


def test_the_op_runs_the_cpp_binding():
    """awqtensor::int4_linear's CPU kernel is the C++ one here (this machine has torch's
    headers and a compiler), and it hands other layouts back to the Python dispatcher."""
    assert cpu_kernel.binding()
    t = weight(16, 64, torch.float32, 32, seed=15)
    plain = t._replace(qweight=t.plain_qweight(), packing_format=packing.PLAIN)
    x = activations(2, 64, torch.float32, seed=16)
    assert max_rel_err(F.linear(x, plain), reference.linear(x, plain)) < TOLERANCE[torch.float32]


def test_disable_and_bad_isa(monkeypatch):
    monkeypatch.setenv("AWQTENSOR_DISABLE", "cpu_blocks")
    assert Int4AWQTensor.from_float(torch.randn(16, 64), 32).packing_format != packing.CPU_BLOCKS
    monkeypatch.delenv("AWQTENSOR_DISABLE")
    monkeypatch.setenv("AWQTENSOR_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="AWQTENSOR_CPU_ISA=sse9"):
        cpu_kernel.isa()
    t = weight(8, 64, torch.float32, 32, seed=17)
    with pytest.raises(RuntimeError, match="AWQTENSOR_CPU_ISA=sse9"):
        F.linear(torch.randn(1, 64), t)


# ---- dequantization and the large-M route (dequantize to bf16, torch's matmul) ----

@pytest.mark.parametrize("n,k,group_size", CASES)
def test_dequantize_matches_float64(n, k, group_size, monkeypatch):
    """Every path gives the same bits; fp32 is the weight up to fp32 rounding (of scale *
    zero, up to 15 scales: 1e-6 of the largest weight), bf16 within half a bf16 step
    (2^-8 relative) more."""
    t = weight(n, k, torch.float32, group_size, zero_point=n % 2 == 1, seed=n + k)
    exact = torch.from_numpy(reference.dequantize(t))
    for dtype, bound in ((torch.float32, 0.0), (torch.bfloat16, 2.0 ** -8)):
        outputs = {}
        for name in ISAS:
            monkeypatch.setenv("AWQTENSOR_CPU_ISA", name)
            outputs[name] = cpu_kernel.dequantize(t.qweight, t.scales.shape[1], t.group_size, (n, k), dtype)
        for name, w in outputs.items():
            assert torch.equal(w, outputs["scalar"]), name
        w = outputs["scalar"]
        assert w.dtype == dtype and w.shape == (n, k)
        assert ((w.double() - exact).abs() <= bound * exact.abs() + 1e-6 * exact.abs().max()).all(), dtype


@pytest.fixture
def dense_route_everywhere():
    """The dense route from M = 2 and any size, whatever this CPU's speed."""
    old = cpu_kernel.dense_route(2, 0)
    yield
    cpu_kernel.dense_route(**old)


def test_dense_route_default_follows_the_cpu():
    bf16 = cpu_kernel.fast_bf16_matmul()
    assert cpu_kernel._dense["min_m"] == (cpu_kernel.DENSE_MIN_M if bf16 else cpu_kernel.FP32_DENSE_MIN_M)
    assert cpu_kernel._dense["dtype"] == (torch.bfloat16 if bf16 else torch.float32)
    if cpu_kernel.binding():
        assert cpu_kernel.dense_unsuitable(1, 4096, 4096) is not None  # decode stays on the int8 kernel
        assert cpu_kernel.dense_unsuitable(15, 4096, 4096) is not None
        assert cpu_kernel.dense_unsuitable(256, 4096, 4096) is None
        assert cpu_kernel.dense_unsuitable(512, 192, 576) is None  # prefill
        if bf16:
            assert cpu_kernel.dense_unsuitable(16, 192, 576) is not None  # too small to pay torch's setup
        else:
            assert cpu_kernel.dense_unsuitable(128, 4096, 4096) is not None  # sgemm beats the kernel later


@pytest.mark.skipif(not ISAS or not cpu_kernel.binding(), reason="the dense route lives in the C++ op")
@pytest.mark.parametrize("route", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1 << 24, 1000])  # the weight in one piece; in several, the last one short
def test_dense_route_matches_float64_model(dense_route_everywhere, isa, dtype, chunk, route):
    cpu_kernel.dense_route(2, 0, chunk, dtype=route)
    # bf16: rounding of the result (2^-8 of itself) on top of the fp32 sum; fp32: the result's dtype
    tolerance = TERMS_TOLERANCE[torch.bfloat16 if route == torch.bfloat16 else dtype]
    for (n, k, group_size), (zero_point, act_scale) in zip(CASES, [(True, False), (False, True), (True, True)] * 3):
        t = weight(n, k, dtype, group_size, zero_point, act_scale, seed=n * k + 1)
        bias = bias_for(n, dtype, seed=k)
        x = activations(20, k, dtype, seed=n + 2)
        assert cpu_kernel.dense_unsuitable(20, n, k) is None
        for b in (None, bias):
            y = F.linear(x, t, b)
            assert y.dtype == dtype and y.shape == (20, n)
            expected = reference.dense_route_linear(x, t, b, route)
            assert products_error(y, expected, x, t, b) < tolerance, (n, k, group_size)
            int8 = cpu_kernel.linear(x, t.qweight, t.scales.shape[1], t.group_size, t.act_scale, b, n)
            assert not torch.equal(y, int8)  # the route ran, not the kernel
        y3 = F.linear(x.reshape(4, 5, k), t, bias)  # leading dimensions
        assert torch.equal(y3.reshape(20, n), F.linear(x, t, bias))
        one = F.linear(x[:1], t, bias)  # below the route's M: the int8 kernel
        assert torch.equal(one, cpu_kernel.linear(x[:1], t.qweight, t.scales.shape[1], t.group_size, t.act_scale, bias, n))


@pytest.mark.skipif(not ISAS or not cpu_kernel.binding(), reason="the dense route lives in the C++ op")
def test_dense_route_can_be_turned_off(dense_route_everywhere, monkeypatch):
    t = weight(24, 192, torch.float32, 64, act_scale=True, seed=18)
    x = activations(32, 192, torch.float32, seed=19)
    int8 = cpu_kernel.linear(x, t.qweight, t.scales.shape[1], t.group_size, t.act_scale, None, 24)
    assert not torch.equal(F.linear(x, t), int8)
    for name in ("cpu_dense", "cpu_dense_bf16"):  # the second: its name before the fp32 route existed
        monkeypatch.setenv("AWQTENSOR_DISABLE", name)
        assert "AWQTENSOR_DISABLE" in cpu_kernel.dense_unsuitable(32, 24, 192)
        assert torch.equal(F.linear(x, t), int8)
    monkeypatch.delenv("AWQTENSOR_DISABLE")
    cpu_kernel.dense_route(None)
    assert cpu_kernel.dense_unsuitable(32, 24, 192) is not None
    assert torch.equal(F.linear(x, t), int8)
    with pytest.raises(ValueError, match="chunk"):
        cpu_kernel.dense_route(2, 0, chunk=0)
    with pytest.raises(ValueError, match="bfloat16 or torch.float32"):
        cpu_kernel.dense_route(2, 0, dtype=torch.float16)


@pytest.mark.skipif(not ISAS or not cpu_kernel.binding(), reason="the dense route lives in the C++ op")
def test_dense_route_under_compile_and_opcheck(dense_route_everywhere):
    t = weight(32, 128, torch.float32, 64, act_scale=True, seed=20)
    linear = torch.nn.Linear(128, 32, bias=True)
    linear.weight = torch.nn.Parameter(t, requires_grad=False)
    x = activations(24, 128, torch.float32, seed=21)
    compiled = torch.compile(linear, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), linear(x), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.awqtensor.int4_linear.default,
                          (x, t.qweight, t.scales, t.zeros, t.act_scale, linear.bias.detach(), t.group_size, t.packing_format))


# ---- ARM64 (NEON, dotprod) under qemu: the same source, cross-compiled ----

CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
DRIVER = os.path.join(os.path.dirname(__file__), "cpu_kernel_driver.cpp")


@pytest.fixture(scope="module")
def arm64_driver(tmp_path_factory):
    if not (CROSS and QEMU):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (.ci/run installs them)")
    exe = tmp_path_factory.mktemp("arm64") / "driver"
    subprocess.run([CROSS, "-O2", "-static", "-std=c++17", "-ffp-contract=off", "-I", str(cpu_kernel.SOURCE.parent), DRIVER,
                    "-o", str(exe)], check=True, capture_output=True)
    return exe


def run_arm64(driver, isa, x, t, bias):
    """y from the aarch64 build of the kernel, run under qemu."""
    m, k = x.shape
    n, g = t.scales.shape
    header = np.array([m, k, n, g, t.group_size, cpu_kernel.DTYPES[x.dtype], cpu_kernel.ISAS[isa],
                       t.act_scale is not None, bias is not None], dtype=np.int64)
    as_bytes = lambda u: u.contiguous().view(torch.uint8).numpy().tobytes()
    payload = header.tobytes() + as_bytes(x) + as_bytes(t.qweight)
    payload += as_bytes(t.act_scale) if t.act_scale is not None else b""
    payload += as_bytes(bias) if bias is not None else b""
    run = subprocess.run([QEMU, str(driver)], input=payload, capture_output=True, check=True)
    out = torch.frombuffer(bytearray(run.stdout), dtype=torch.uint8)
    return out.view(x.dtype).reshape(m, n)


@pytest.mark.parametrize("arm_isa", ["neon", "neon_dotprod", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_arm64_under_qemu(arm64_driver, arm_isa, dtype):
    for (n, k, group_size), act_scale in zip(CASES, (False, True) * 4):
        t = weight(n, k, dtype, group_size, act_scale=act_scale, seed=n + k)
        x = activations(5, k, dtype, seed=n)
        bias = bias_for(n, dtype, seed=k) if act_scale else None
        y = run_arm64(arm64_driver, arm_isa, x, t, bias)
        assert products_error(y, reference.q8_linear(x, t, bias), x, t, bias) < TERMS_TOLERANCE[dtype], (n, k, group_size)


@pytest.mark.skipif(not ISAS, reason="the CPU kernel is not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_op_is_the_kernels(dtype):
    # awqtensor::dequantize on the CPU (C++ where the binding is built): the kernel's
    # dequantization times act_scale, bit for bit; other layouts go to the reference
    t = weight(40, 200, dtype, 64, act_scale=True, seed=23)
    op = torch.ops.awqtensor.dequantize(t.qweight, t.scales, t.zeros, t.act_scale, t.group_size, 200, t.packing_format)
    kernel = cpu_kernel.dequantize(t.qweight, t.scales.shape[1], t.group_size, (40, 200), dtype)
    assert op.dtype == dtype and torch.equal(op, (kernel * t.act_scale).to(dtype))
    exact = torch.from_numpy(reference.dequantize(t))
    assert ((op.double() - exact).abs() <= 2.0 ** -7 * exact.abs() + 1e-6 * exact.abs().max()).all()
    codes = t.plain_qweight()  # the canonical layout of the same weight: the reference's arithmetic
    plain = torch.ops.awqtensor.dequantize(codes, t.scales, t.zeros, t.act_scale, t.group_size, 200, packing.PLAIN)
    assert torch.allclose(plain, op, rtol=2.0 ** -7, atol=1e-6)
