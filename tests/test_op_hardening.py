"""The awqtensor:: ops on bad input: every argument checked before a pointer reaches a
kernel (the C++ op, the Python paths, the ctypes launcher), NaN and inf propagated through
every CPU route as through F.linear on the dequantized weight in float64, and
AWQTENSOR_DISABLE=cpu_blocks honored by the C++ op."""

import os
import re
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference
from awqtensor import Int4AWQTensor, packing
from awqtensor.ops import cpu, cpu_kernel, w4a8
from awqtensor.ops import reference as op_reference
from conftest import TOLERANCE, max_rel_err

KERNEL = cpu_kernel.unavailable() is None
BINDING = KERNEL and cpu_kernel.binding()
needs_kernel = pytest.mark.skipif(not KERNEL, reason=f"{cpu_kernel.unavailable()}")
needs_binding = pytest.mark.skipif(not BINDING, reason="awqtensor's C++ CPU op is not built here")
ISAS = cpu_kernel.supported_isas() if KERNEL else []
GEMM_KERNELS = w4a8.cpu_kernels() if BINDING else []


def make_weight(n, k, group_size, dtype=torch.float32, seed=0, packing_format=None, activations=None):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05 + 0.01 * torch.randn(n, 1, generator=g)).to(dtype)
    act_scale = (torch.rand(k, generator=g) + 0.5).to(dtype)
    t = Int4AWQTensor.from_float(w, group_size, act_scale=act_scale, activations=activations)
    if packing_format is not None and packing_format != t.packing_format:
        qweight = packing.repack(t.qweight, t.k_padded, t.packing_format, packing_format, t.scales, t.zeros)
        t = t._replace(qweight=qweight, packing_format=packing_format)
    return t


# ---- 1. arguments: each refusal a ValueError naming the argument, expected and actual sizes ----

N, K, GROUP = 40, 96, 64  # two groups, the second half full: K fits 65..128 columns


def _bad_linear_args(t, qweight_shape):
    """(name, change to the op's arguments, what the message must say)."""
    n, g = t.scales.shape
    shape = re.escape(str(list(qweight_shape)))
    return [
        ("act_scale of 1", dict(act_scale=torch.ones(1)), r"act_scale.*\b96 elements.*\[1\]"),
        ("act_scale of K+1", dict(act_scale=torch.ones(K + 1)), r"act_scale.*\b96 elements.*\[97\]"),
        ("act_scale 2-D", dict(act_scale=torch.ones(1, K)), r"act_scale.*\[1, 96\]"),
        ("bias of N-1", dict(bias=torch.randn(N - 1)), r"bias.*\b40 elements.*\[39\]"),
        ("bias of N+1", dict(bias=torch.randn(N + 1)), r"bias.*\b40 elements.*\[41\]"),
        ("bias 2-D", dict(bias=torch.randn(1, N)), r"bias.*\[1, 40\]"),
        ("x too wide", dict(x=torch.randn(2, 129), act_scale=None), r"x\.shape\[-1\] = 129.*65 to 128"),
        ("x too narrow", dict(x=torch.randn(2, 64), act_scale=None), r"x\.shape\[-1\] = 64.*65 to 128"),
        ("qweight short", dict(qweight=t.qweight[:, :-1]), rf"qweight.*{shape}"),
        ("qweight rows", dict(qweight=t.qweight[:-1]), rf"qweight.*{shape}"),
        ("qweight flat", dict(qweight=t.qweight.reshape(-1)), rf"qweight.*{shape}"),
        ("qweight int8", dict(qweight=t.qweight.view(torch.int8)), rf"qweight.*{shape}"),
        ("scales 1-D", dict(scales=t.scales[:, 0]), r"scales must be a 2-D"),
        ("scales int", dict(scales=t.scales.int()), r"scales must be a 2-D .*float"),
        ("zeros shape", dict(zeros=t.zeros[:, :1]), rf"zeros.*\[{n}, {g}\].*\[{n}, 1\]"),
        ("zeros int32", dict(zeros=t.zeros.int()), r"zeros must be uint8"),
        ("group_size 0", dict(group_size=0), r"group_size must be a positive"),
        ("group_size -1", dict(group_size=-1), r"group_size must be a positive"),
        ("group_size 32", dict(group_size=32), r"x\.shape\[-1\] = 96 does not fit .*2 groups of 32"),
        ("x int", dict(x=torch.ones(2, K, dtype=torch.int32)), r"x must be"),
        ("x float64", dict(x=torch.randn(2, K, dtype=torch.float64)), r"x must be"),
        ("x 0-dim", dict(x=torch.tensor(1.0)), r"x must be"),
    ]


def _linear_call(op, t, **changes):
    args = dict(x=torch.randn(2, 3, K), qweight=t.qweight, scales=t.scales, zeros=t.zeros, act_scale=t.act_scale,
                bias=torch.randn(N), group_size=t.group_size, packing_format=t.packing_format)
    args.update(changes)
    return op(*args.values())


LINEAR_OPS = ["int4_linear", "w4a8_linear", "_int4_linear_py", "_w4a8_linear_py"]


@needs_kernel
@pytest.mark.filterwarnings("ignore:awqtensor.*run weight-only here:RuntimeWarning")  # w4a8_linear's, once
@pytest.mark.parametrize("op_name", LINEAR_OPS)
@pytest.mark.parametrize("packing_format", [packing.CPU_BLOCKS, packing.PLAIN])
def test_linear_ops_refuse_bad_arguments(op_name, packing_format):
    # "cpu_blocks": the C++ op's checks (the _py ops: the Python path and the ctypes launcher);
    # "plain": the C++ op hands the call to the Python path, which checks it
    t = make_weight(N, K, GROUP, packing_format=packing_format)
    op = getattr(torch.ops.awqtensor, op_name).default
    shape, _ = packing.qweight_layout(packing_format, N, 2, GROUP)
    assert _linear_call(op, t).shape == (2, 3, N)  # the good call runs
    for name, changes, message in _bad_linear_args(t, shape):
        with pytest.raises(ValueError, match=message):
            _linear_call(op, t, **changes)
            pytest.fail(f"{name}: accepted")


def test_reviewers_example_is_refused():
    """An act_scale of one element was read 256 elements deep; refused where the weight is
    made, or at the call, never garbage."""
    with pytest.raises(ValueError, match="act_scale"):
        w = Int4AWQTensor.from_float(torch.randn(64, 256), 64, act_scale=torch.ones(1))
        F.linear(torch.randn(2, 256), w)


@needs_kernel
def test_ctypes_launcher_refuses_bad_arguments():
    t = make_weight(N, K, GROUP)
    x, g = torch.randn(3, K), t.scales.shape[1]
    assert cpu_kernel.linear(x, t.qweight, g, GROUP, t.act_scale, None, N).shape == (3, N)
    cases = [
        (dict(act_scale=torch.ones(1)), r"act_scale.*96 elements"),
        (dict(bias=torch.randn(N + 3)), r"bias.*40 elements.*\[43\]"),
        (dict(out_features=N + 1), r"qweight.*\[41, 80\].*\[40, 80\]"),
        (dict(n_groups=3), r"x\.shape\[-1\] = 96 does not fit .*3 groups"),
        (dict(x=torch.randn(3, 200)), r"x\.shape\[-1\] = 200"),
        (dict(x=x.double()), r"x must be"),
    ]
    for changes, message in cases:
        args = dict(x=x, qweight=t.qweight, n_groups=g, group_size=GROUP, act_scale=t.act_scale, bias=None,
                    out_features=N)
        args.update(changes)
        with pytest.raises(ValueError, match=message):
            cpu_kernel.linear(*args.values())
    with pytest.raises(ValueError, match=r"qweight.*\[40, 80\]"):
        cpu_kernel.dequantize(t.qweight[:, :40], g, GROUP, (N, K), torch.float32)
    with pytest.raises(ValueError, match=r"in_features = 200"):
        cpu_kernel.dequantize(t.qweight, g, GROUP, (N, 200), torch.float32)


@needs_kernel
@pytest.mark.parametrize("op_name", ["dequantize", "_dequantize_py"])
@pytest.mark.parametrize("packing_format", [packing.CPU_BLOCKS, packing.PLAIN])
def test_dequantize_refuses_bad_arguments(op_name, packing_format):
    t = make_weight(N, K, GROUP, packing_format=packing_format)
    op = getattr(torch.ops.awqtensor, op_name).default
    args = dict(qweight=t.qweight, scales=t.scales, zeros=t.zeros, act_scale=t.act_scale, group_size=GROUP,
                in_features=K, packing_format=packing_format)
    assert op(*args.values()).shape == (N, K)
    shape = re.escape(str(list(packing.qweight_layout(packing_format, N, 2, GROUP)[0])))
    cases = [
        (dict(in_features=129, act_scale=None), r"in_features = 129 does not fit"),
        (dict(in_features=64, act_scale=None), r"in_features = 64 does not fit"),
        (dict(act_scale=torch.ones(1)), r"act_scale.*96 elements.*\[1\]"),
        (dict(qweight=t.qweight[:, 1:]), rf"qweight.*{shape}"),
        (dict(zeros=t.zeros[:1]), r"zeros.*\[40, 2\]"),
        (dict(scales=t.scales.reshape(-1)), r"scales must be a 2-D"),
        (dict(group_size=0), r"group_size must be a positive"),
    ]
    for changes, message in cases:
        bad = dict(args, **changes)
        with pytest.raises(ValueError, match=message):
            op(*bad.values())


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_decode_attention_refuses_bad_arguments(impl):
    attend = torch.ops.awqtensor.decode_attention if impl == "op" else op_reference.decode_attention
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    mask = torch.rand(2, 1, 1, 30) > 0.3
    mask[..., 0] = True
    assert attend(q, k, v, mask, 0.25).shape == (2, 1, 4, 16)
    cases = [
        ((torch.randn(2, 4, 2, 16), k, v, mask), "query"),           # two query rows
        ((q, k, torch.randn(2, 2, 29, 16), mask), "key, value"),     # value shorter than key
        ((torch.randn(2, 3, 1, 16), k, v, mask), "do not fit|multiple of KVH"),
        ((q, torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8), mask), "do not fit|key, value"),
        ((q, k, v, mask[..., :10]), "mask"),                       # mask shorter than the cache
        ((q, k, v, mask.int()), "mask"),
        ((q.int(), k, v, mask), "must be float"),
    ]
    for args, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=message):
            attend(*args, 0.25)


# ---- 2. NaN and inf: as F.linear on the dequantized weight in float64, on every route ----

SHAPES = [(44, 96, 64), (48, 576, 64), (48, 100, 32)]  # (N, K, group_size): K not a multiple of the group
KINDS = ("nan", "inf", "-inf", "inf-inf")


def _columns(w64):
    """Two columns of the float64 weight [N, K] where +inf gives every outcome: one holding
    exact zeros (inf * 0 = NaN) and both signs; another whose signs both agree and disagree
    with the first's (+inf and -inf meet: NaN, or add up to +-inf)."""
    signs = np.sign(w64)
    zero_counts = (signs == 0).sum(0) * ((signs > 0).any(0) & (signs < 0).any(0))
    c1 = int(np.argmax(zero_counts))
    assert zero_counts[c1] > 0
    mixed = [c for c in range(w64.shape[1]) if c != c1 and (signs[:, c] * signs[:, c1] > 0).any()
             and (signs[:, c] * signs[:, c1] < 0).any()]
    return c1, mixed[0]


def _poison(x, row, kind, c1, c2, nan_column):
    if kind == "nan":
        x[row, nan_column] = float("nan")
    elif kind == "inf":
        x[row, c1] = float("inf")
    elif kind == "-inf":
        x[row, c1] = float("-inf")
    else:
        x[row, c1], x[row, c2] = float("inf"), float("-inf")


def _pattern(y):
    """0 finite, 1 +inf, -1 -inf, 2 NaN."""
    y = torch.as_tensor(y).double()
    return torch.where(y.isnan(), 2.0, torch.where(y.isinf(), y.sign(), 0.0))


def _expected(x_rows, w64, bias):
    """F.linear's float64 outcome for rows holding NaN or inf, term by term (numpy: IEEE
    products and sums, no BLAS shortcuts)."""
    with np.errstate(invalid="ignore", over="ignore"):
        y = (x_rows.double().numpy()[:, None, :] * w64[None]).sum(-1)
    return y if bias is None else y + bias.double().numpy()


def _cases(m):
    """(the rows to poison with their kinds) per call: at M = 1 one call per kind; else one
    call with NaN, inf and inf-inf rows (and -inf from M = 8) between finite rows."""
    if m == 1:
        return [{0: kind} for kind in KINDS]
    rows = {0: "nan", m // 2: "inf", m - 1: "inf-inf"}
    if m >= 8:
        rows[1] = "-inf"
    return [rows]


def check_route(call, dtype, ms=(1, 5, 33, 300), shapes=SHAPES, **weight_kwargs):
    """``call(x, t, bias)`` on a weight per shape: rows holding NaN or inf give F.linear's
    float64 pattern of NaN and +-inf (every output of such a row is non-finite), and the
    other rows exactly what they give without the poisoned rows."""
    for i, (n, k, group_size) in enumerate(shapes):
        t = make_weight(n, k, group_size, dtype, seed=n + k, **weight_kwargs)
        w64 = reference.dequantize(t)  # act_scale folded in
        c1, c2 = _columns(w64)
        bias = None if i == 0 else torch.randn(n).to(dtype)
        for m in ms:
            x_clean = torch.randn(m, k).to(dtype)
            y_clean = call(x_clean, t, bias)
            assert torch.isfinite(y_clean).all()
            for poisoned in _cases(m):
                x = x_clean.clone()
                for row, kind in poisoned.items():
                    _poison(x, row, kind, c1, c2, nan_column=(7 * row) % k)
                y = call(x, t, bias)
                assert y.shape == (m, n) and y.dtype == dtype
                bad = sorted(poisoned)
                expected = _pattern(_expected(x[bad], w64, bias))
                assert (expected != 0).all()
                assert torch.equal(_pattern(y[bad]), expected), (n, k, m, poisoned)
                good = [r for r in range(m) if r not in poisoned]
                assert torch.equal(y[good], y_clean[good]), (n, k, m, "finite rows changed")
            if m == 1:  # the columns chosen: +inf gives NaN, +inf and -inf; +inf with -inf NaN and +-inf
                outcomes = {}
                for kind in ("inf", "inf-inf"):
                    x = x_clean.clone()
                    _poison(x, 0, kind, c1, c2, nan_column=0)
                    outcomes[kind] = set(_pattern(_expected(x, w64, bias)).unique().tolist())
                assert outcomes["inf"] == {-1.0, 1.0, 2.0}
                assert 2.0 in outcomes["inf-inf"] and len(outcomes["inf-inf"]) > 1


@pytest.fixture
def no_dense_route():
    old = cpu_kernel.dense_route(None)
    yield
    cpu_kernel.dense_route(**old)


@pytest.fixture
def gemm_route():
    old = w4a8.cpu_route(**w4a8._route)
    yield
    w4a8.cpu_route(**old)


DTYPES = [torch.float32, torch.bfloat16]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("isa", ISAS)
def test_nonfinite_int8_kernel(no_dense_route, monkeypatch, isa, dtype):
    monkeypatch.setenv("AWQTENSOR_CPU_ISA", isa)
    check_route(F.linear, dtype)


@needs_binding
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", GEMM_KERNELS)
def test_nonfinite_w4a8_gemm(gemm_route, kernel, dtype):
    w4a8.cpu_route(1, None, kernel)
    assert w4a8.reasons(1, "cpu", 64, packing.CPU_BLOCKS)["w4a8"] is None
    check_route(F.linear, dtype, activations="int8")


@needs_binding
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 1000])  # the weight in one piece; in several
def test_nonfinite_dense_route(route, dtype, chunk):
    old = cpu_kernel.dense_route(1, 0, chunk, dtype=route)
    try:
        assert cpu_kernel.dense_unsuitable(1, 44, 96) is None
        check_route(F.linear, dtype, ms=(1, 33) if chunk else (1, 5, 33, 300))
    finally:
        cpu_kernel.dense_route(**old)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_default_routes(dtype):
    # as configured for this CPU: the int8 kernel at decode, the dense route (fp32 or bf16) at 300 rows
    check_route(F.linear, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_cpu_int4pack(dtype):
    # torch's int4 kernel (M < 3 in fp32, every M in bf16), else dequantize + matmul
    shapes = [s for s in SHAPES if packing.cpu_int4pack_unsupported(s[0], s[2], dtype) is None]
    assert cpu.int4pack_unsuitable(torch.ones(1, 96, dtype=dtype), packing.CPU_INT4PACK) is None
    check_route(F.linear, dtype, shapes=shapes, packing_format=packing.CPU_INT4PACK)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_ctypes_launcher(dtype):
    # the kernel as the ctypes build runs it (AWQTENSOR_CPU_BINDING=ctypes): cpu_kernel.linear
    def call(x, t, bias):
        return cpu_kernel.linear(x, t.qweight, t.scales.shape[1], t.group_size, t.act_scale, bias, t.shape[0])

    check_route(call, dtype)
    check_route(lambda x, t, bias: torch.ops.awqtensor._int4_linear_py(*_op_args(x, t, bias)), dtype, ms=(1, 5))


def _op_args(x, t, bias):
    return x, t.qweight, t.scales, t.zeros, t.act_scale, bias, t.group_size, t.packing_format


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_reference(dtype, monkeypatch):
    check_route(F.linear, dtype, ms=(1, 5), packing_format=packing.PLAIN)
    if KERNEL:  # a "cpu_blocks" weight with the kernel disabled: the reference reads that layout
        monkeypatch.setenv("AWQTENSOR_DISABLE", "cpu_blocks")
        check_route(F.linear, dtype, ms=(1, 5), packing_format=packing.CPU_BLOCKS)


# ---- 3. AWQTENSOR_DISABLE=cpu_blocks reaches the C++ op ----

@needs_binding
@pytest.mark.parametrize("dtype", DTYPES)
def test_disable_cpu_blocks_runs_the_reference(gemm_route, monkeypatch, dtype):
    w4a8.cpu_route(1)  # the W4A8 GEMM at every M, unless disabled
    for activations in (None, "int8"):
        t = make_weight(48, 576, 64, dtype, seed=3, activations=activations)
        x, bias = torch.randn(5, 576).to(dtype), torch.randn(48).to(dtype)
        kernel = F.linear(x, t, bias)
        monkeypatch.setenv("AWQTENSOR_DISABLE", "cpu_blocks")
        with warnings.catch_warnings():  # int8 weights: "run weight-only here (disabled by ...)", once
            warnings.simplefilter("ignore", RuntimeWarning)
            y = F.linear(x, t, bias)
        exact = op_reference.int4_linear(x, t.qweight, t.scales, t.zeros, t.act_scale, bias, t.group_size,
                                         t.packing_format)
        assert torch.equal(y, exact), activations  # the reference, not the int8 kernel
        assert not torch.equal(y, kernel)
        assert max_rel_err(y, reference.linear(x, t, bias)) < TOLERANCE[dtype]
        op = torch.ops.awqtensor.int4_linear if activations is None else torch.ops.awqtensor.w4a8_linear
        assert torch.equal(op(*_op_args(x, t, bias)), exact)
        monkeypatch.delenv("AWQTENSOR_DISABLE")
        assert torch.equal(F.linear(x, t, bias), kernel)  # and back


# ---- ARM64 (NEON, dotprod) under qemu: the same source, cross-compiled ----

CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
TESTS = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def arm64_drivers(tmp_path_factory):
    if not (CROSS and QEMU and KERNEL):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (.ci/run installs them)")
    out = tmp_path_factory.mktemp("arm64")
    for name in ("cpu_kernel_driver", "cpu_gemm_driver"):
        subprocess.run([CROSS, "-O2", "-static", "-std=c++17", "-ffp-contract=off", "-I",
                        str(cpu_kernel.SOURCE.parent), os.path.join(TESTS, f"{name}.cpp"), "-o", str(out / name)],
                       check=True, capture_output=True)
    return out


def _arm64(driver, header, *tensors):
    payload = np.array(header, dtype=np.int64).tobytes()
    payload += b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)
    return subprocess.run([QEMU, str(driver)], input=payload, capture_output=True, check=True).stdout


@pytest.mark.parametrize("isa", ["neon", "neon_dotprod", "scalar"])
def test_nonfinite_arm64_decode_kernel(arm64_drivers, isa):
    def call(x, t, bias):
        m, k = x.shape
        n, g = t.scales.shape
        header = [m, k, n, g, t.group_size, cpu_kernel.DTYPES[x.dtype], cpu_kernel.ISAS[isa], 1, bias is not None]
        out = _arm64(arm64_drivers / "cpu_kernel_driver", header, x, t.qweight, t.act_scale,
                     *([bias] if bias is not None else []))
        return torch.frombuffer(bytearray(out), dtype=torch.uint8).view(x.dtype).reshape(m, n)

    check_route(call, torch.float32, ms=(1, 5), shapes=SHAPES[:2])


@pytest.mark.parametrize("kernel", ["neon_dotprod", "scalar"])
def test_nonfinite_arm64_gemm(arm64_drivers, kernel):
    def call(x, t, bias):  # the GEMM takes x * act_scale in fp32 (as w4a8_linear_cpu hands it over)
        m, k = x.shape
        n, g = t.scales.shape
        header = [m, k, n, g, t.group_size, w4a8.CPU_KERNELS.index(kernel), bias is not None]
        out = _arm64(arm64_drivers / "cpu_gemm_driver", header, x * t.act_scale, t.qweight,
                     *([bias] if bias is not None else []))
        return torch.frombuffer(bytearray(out), dtype=torch.float32).reshape(m, n)

    check_route(call, torch.float32, ms=(1, 5), shapes=SHAPES[:2])
