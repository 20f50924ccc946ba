"""awqtensor's CPU kernel: build on first use, load, launch.

The kernel (``cpu_kernel.cpp``, beside this file) multiplies int4 weights in the
``"cpu_blocks"`` layout by activations quantized on the fly to int8 per 32 columns, with
exact integer dot products (see the .cpp for the arithmetic). It holds an AVX2 path (and
AVX-VNNI, and AVX512-VNNI with two weight rows per register, bit-identical to AVX-VNNI),
a NEON path (and dotprod), and portable C++, picked by the features of the CPU
it runs on (``isa()``). It has no torch headers: the system C++ compiler builds it in
about a second, once per (source, compiler, machine), into
``$AWQTENSOR_CACHE/cpu_kernel`` (default ``~/.cache/awqtensor``), whose directories are
created private (0o700); a cached library, or a directory above it, that another user
could have written (not owned by the current user, or writable by group or others) is
refused, with the warning below (a library is code: it runs when loaded). OpenMP threads come
from the libgomp torch already loaded, so ``torch.set_num_threads`` governs them.

Two builds of the same kernel: ``cpu_op.cpp`` includes it and registers it, against
torch's headers, as ``awqtensor::int4_linear``'s C++ CPU kernel, so a call costs no
Python; where that build fails, the kernel alone (no torch headers) runs through ctypes
from ``awqtensor/ops/cpu.py`` (``AWQTENSOR_CPU_BINDING=ctypes`` chooses that one).
Without a compiler, or when both builds fail, one warning says why and weights stay in
torch's int4 layout. ``AWQTENSOR_DISABLE=cpu_blocks`` turns the kernel off;
``AWQTENSOR_CPU_ISA=scalar|avx2|avx2_vnni|avx512_vnni|neon|neon_dotprod`` forces a path.

Accuracy: int8 activations add a relative error of about 0.6% to the outputs (1% with
outlier channels; ``tests/test_cpu_kernel.py``); perplexity moves by under 0.1 (README).
A row of x holding NaN or inf, which int8 cannot carry, is flagged while it is quantized
(a compare per 32 columns) and computed again on the dequantized weight in fp32, so NaN
and inf come out as ``F.linear`` on that weight gives them (``tests/test_op_hardening.py``).

Large M (prefill) on CPUs with native bf16 matmuls (AVX512-BF16 or AMX, as torch detects
them): from ``DENSE_MIN_M`` rows and ``DENSE_MIN_MACS`` multiply-adds the C++ op
dequantizes the weight to bf16 (``DENSE_CHUNK`` elements at a time, into a buffer each
thread keeps) and runs torch's bf16 matmul instead (``dense_linear`` in cpu_op.cpp; not
in the ctypes build): on our AMX Xeon, at M = 128 on 4096x4096, 4.4 ms against the
int8 kernel's 20 ms and dense fp32's 13-16 ms (``benchmarks/cpu_linear.py``). Its outputs
carry bf16 rounding (activations, weights and result; fp32 accumulation): RTN perplexity
29.31 against 29.38 with int8 activations and 29.30 exact (README). CPUs without native
bf16 take the same route in fp32 (exact products) from ``FP32_DENSE_MIN_M`` rows, where
sgemm beats the int8 kernel. ``dense_route(None)`` or ``AWQTENSOR_DISABLE=cpu_dense``
turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from . import reference

log = logging.getLogger("awqtensor")
SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
BINDING = Path(__file__).with_name("cpu_op.cpp")  # the kernel as awqtensor::int4_linear's C++ CPU kernel
STEP = Path(__file__).with_name("cpu_step.cpp")  # included by cpu_op.cpp: awqtensor's DecodePlan
GEMM = [Path(__file__).with_name(name) for name in ("cpu_gemm.cpp", "cpu_gemm_micro.cpp")]  # the W4A8 GEMM
ISAS = {"scalar": 0, "avx2": 1, "avx2_vnni": 2, "neon": 3, "neon_dotprod": 4, "avx512_vnni": 5}
PREFERENCE = ("avx512_vnni", "avx2_vnni", "avx2", "neon_dotprod", "neon", "scalar")  # fastest first
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The large-M route: from this many rows and multiply-adds, on CPUs with native bf16
# matmuls. Measured on a 2-core AMX Xeon (int8 kernel against the route, SmolLM2's shapes
# and 4096x4096): at M = 8 the kernel wins everywhere; from M = 16 the route wins once a
# call has ~3M multiply-adds to pay for torch's matmul setup (k/v 192x576 from M = 32).
# On a 2-core AMD EPYC with AVX512-BF16 and no AMX the route wins from M = 32 (but k/v);
# at M = 16, against the kernel's AVX512-VNNI path, three runs of benchmarks/cpu_route.py
# (which checks a CPU) put the route at 0.81-0.99x, 1.07-1.29x and 1.21-2.04x the kernel's
# speed on the shapes with 3M multiply-adds, and a fourth, with 8-row tiles, at
# 0.84-1.13x: around a tie, within noise, so M = 16 stays.
DENSE_MIN_M = 16
DENSE_MIN_MACS = 3_000_000
# Without native bf16 the route dequantizes to fp32 and calls sgemm. On a 2-core AMD EPYC
# with AVX2 only (benchmarks/cpu_route.py, against the kernel's AVX2 path, two runs):
# SmolLM2's shapes and 4096x4096 gain 1.05-1.57x from M = 256 in both; at M = 128 one run
# had the route 0.89-1.25x the kernel's speed, the other 0.69-1.25x. So from M = 256.
FP32_DENSE_MIN_M = 256
FP32_DENSE_MIN_MACS = 0


def last_level_cache_bytes() -> int:
    """The size of the largest CPU cache Linux reports for CPU 0 (0 where it reports none)."""
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (path / "size").read_text().strip()  # e.g. "32768K"
            sizes.append(int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0))
        except (OSError, ValueError):
            continue
    return max(sizes)


# Weight elements the route dequantizes at a time (into a buffer each calling thread keeps):
# a quarter of the last-level cache in bf16, so that the matmul reads them back from the
# cache, between 1M and 16M elements (4M where the cache size is unknown). Measured on a
# 2-core AMD EPYC with 32 MB of L3 (F.linear timed under dense_route(1, 0, chunk)):
# 4096x4096 at M = 16 took 1.9-2.3 ms in 2M-8M element chunks, 3.3 ms in one 16M chunk
# that spills to DRAM, 4-8.5 ms in chunks of 256K elements and less (torch's matmul setup).
_LLC = last_level_cache_bytes()
DENSE_CHUNK = min(max(_LLC // 8, 1 << 20), 1 << 24) if _LLC else 1 << 22
# no FMA contraction of scalar code: every output takes one rounding sequence, whatever the
# tile shape that computed it (batch invariance)
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off"]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class UntrustedCache(RuntimeError):
    """A cache directory or library that another user could have written."""


def _trusted(path: Path) -> None:
    """Raise UntrustedCache unless ``path`` is owned by the current user and not writable by
    group or others: a library found in the cache is loaded, so runs, as this process."""
    if not hasattr(os, "getuid"):  # Windows: no POSIX owner and mode bits to check
        return
    info = os.stat(path)
    if info.st_uid != os.getuid():
        raise UntrustedCache(f"{path} is owned by uid {info.st_uid}, not by you (uid {os.getuid()}); set "
                             f"AWQTENSOR_CACHE to a directory of your own")
    if info.st_mode & 0o022:
        raise UntrustedCache(f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); run "
                             f"chmod go-w {path}, or set AWQTENSOR_CACHE to a private directory")


def _private_dir(path: Path) -> Path:
    """``path``, created with mode 0o700 where missing, after ``_trusted`` accepts it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _trusted(path)
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("AWQTENSOR_CACHE") or Path.home() / ".cache" / "awqtensor")


def _cache_dir() -> Path:
    """``$AWQTENSOR_CACHE/cpu_kernel``, its directories created private where missing and
    refused (UntrustedCache) where another user could write them."""
    _private_dir(_cache_root())
    return _private_dir(_cache_root() / "cpu_kernel")


def _torch_flags() -> list[str]:
    """Compile and link flags for a file that includes torch's headers."""
    root = Path(torch.__file__).parent
    lib = root / "lib"
    return [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-w",
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _build(compiler: str, binding: bool = False) -> Path:
    """Compile the kernel into the cache (reused when source, compiler, machine and, for
    the torch binding, torch's version match). ``binding``: as awqtensor::int4_linear's
    C++ CPU kernel (``cpu_op.cpp``, a few seconds: torch's headers); else plain C entry
    points for ctypes (about a second)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = SOURCE.read_bytes()
    if binding:
        sources += BINDING.read_bytes() + STEP.read_bytes() + b"".join(g.read_bytes() for g in GEMM) + torch.__version__.encode()
    key = hashlib.sha256(sources + version.encode() + " ".join(FLAGS).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    target = _private_dir(_cache_dir() / key) / ("libawqtensor_cpu_op.so" if binding else "libawqtensor_cpu.so")
    if target.exists():
        _trusted(target)
        if not target.is_file():
            raise UntrustedCache(f"{target} is not a regular file; delete it")
        return target
    log.info("building awqtensor's CPU kernel%s into %s (once)", " for torch" if binding else "", target.parent)
    extra = _torch_flags() if binding else []
    errors = []
    for openmp in (["-fopenmp"], []):  # a compiler without OpenMP still builds a serial kernel
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            run = subprocess.run([compiler, *FLAGS, *openmp, str(BINDING if binding else SOURCE), "-o", str(out),
                                  *extra], capture_output=True, text=True)
            if run.returncode == 0:
                os.chmod(out, 0o700)  # whatever the umask: _trusted refuses a group-writable library
                os.replace(out, target)  # atomic: concurrent builds cannot see half a file
                return target
            errors.append(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
    raise RuntimeError(f"{compiler} failed: {errors[-1]}")


_binding_loaded: list[Path] = []  # torch keeps a loaded binding's registration for good: load one, once


def _load_binding(compiler: str) -> ctypes.CDLL | None:
    """The torch binding, loaded into torch's dispatcher; None if it cannot be built here
    (the plain build then serves through ctypes)."""
    if os.environ.get("AWQTENSOR_CPU_BINDING") == "ctypes":
        return None
    try:
        path = _binding_loaded[0] if _binding_loaded else _build(compiler, binding=True)
        if not _binding_loaded:
            torch.ops.load_library(str(path))
            _binding_loaded.append(path)
        lib = ctypes.CDLL(str(path))
        lib.awq_cpu_set_dense_route.argtypes = [ctypes.c_int64] * 4
        return lib
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why not); warns once on failure."""
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
        lib = _load_binding(compiler) or ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        hint = f" (is {_cache_root()} writable? AWQTENSOR_CACHE moves it)" if isinstance(e, PermissionError) else ""
        what = "'s cache is refused" if isinstance(e, UntrustedCache) else " could not be built"
        reason = f"the CPU kernel{what}: {e}{hint}"
        warnings.warn(f"awqtensor: {reason}; int4 matmuls on the CPU use torch's slower int4 kernel",
                      RuntimeWarning, stacklevel=3)
        return None, reason
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.awq_cpu_linear.argtypes = [p, i64, i64, i32, p, i64, i64, i64, p, p, p, i32]
    lib.awq_cpu_linear.restype = i32
    lib.awq_cpu_dequantize.argtypes = [p, i64, i64, i64, i64, i32, p, i32]
    lib.awq_cpu_dequantize.restype = i32
    lib.awq_cpu_isa_supported.argtypes = [i32]
    lib.awq_cpu_isa_supported.restype = i32
    if hasattr(lib, "awq_cpu_set_dense_route"):  # the C++ op hands large calls to dense_linear
        lib.awq_cpu_set_dense_route(*_dense_thresholds())
    if hasattr(lib, "awq_cpu_set_w4a8_route"):  # the C++ op's W4A8 GEMM (cpu_gemm.cpp)
        from . import w4a8

        w4a8.install(lib)
    return lib, None


def binding() -> bool:
    """Whether awqtensor::int4_linear's CPU kernel is the C++ one (no Python per call)."""
    return _load()[0] is not None and bool(_binding_loaded)


def unavailable() -> str | None:
    """Why the kernel cannot run here, or None. Builds it on the first call."""
    if "cpu_blocks" in os.environ.get("AWQTENSOR_DISABLE", "").split(","):
        return "disabled by AWQTENSOR_DISABLE=cpu_blocks"
    return _load()[1]


def supported_isas() -> list[str]:
    lib = _load()[0]
    return [] if lib is None else [name for name in PREFERENCE if lib.awq_cpu_isa_supported(ISAS[name])]


def isa() -> str:
    """The instruction set the kernel runs with: ``AWQTENSOR_CPU_ISA``, else the fastest supported."""
    forced = os.environ.get("AWQTENSOR_CPU_ISA")
    supported = supported_isas()
    if forced:
        if forced not in supported:
            raise ValueError(f"AWQTENSOR_CPU_ISA={forced}: this CPU/build supports {supported}")
        return forced
    return supported[0]


@functools.cache
def _isa_code(forced: str | None) -> int:
    return ISAS[isa()]


def _check_cpu(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{op}: {name} must be a CPU tensor, got one on {t.device}")


def linear(x: torch.Tensor, qweight: torch.Tensor, n_groups: int, group_size: int,
           act_scale: torch.Tensor | None, bias: torch.Tensor | None, out_features: int,
           check: bool = True) -> torch.Tensor:
    """``x [..., K] (* act_scale) @ W.T + bias`` for a "cpu_blocks" ``qweight``, in x.dtype.
    Every microsecond here counts at decode, where a SmolLM2 layer's kernel takes ~5 us.
    The arguments are checked against each other first (a ValueError), unless the caller
    did (``check=False``: ``cpu.int4_linear``, after ``reference.check_linear_args``)."""
    if check:
        op = "awqtensor cpu_kernel.linear"
        reference.check_x(op, x)
        reference.check_layout(op, qweight, out_features, n_groups, group_size, x.shape[-1], "x.shape[-1]",
                               "cpu_blocks")
        reference.check_vector(op, "act_scale", act_scale, x.shape[-1], "x.shape[-1]")
        reference.check_vector(op, "bias", bias, out_features, "out_features")
        _check_cpu(op, x=x, qweight=qweight, act_scale=act_scale, bias=bias)
    k = x.shape[-1]
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, out_features, dtype=x.dtype)
    if act_scale is not None and (act_scale.dtype != x.dtype or not act_scale.is_contiguous()):
        act_scale = act_scale.to(x.dtype).contiguous()
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    if not qweight.is_contiguous():  # never by construction; the kernel reads raw bytes
        qweight = qweight.contiguous()
    if m:
        rc = _load()[0].awq_cpu_linear(
            x2.data_ptr(), m, k, DTYPES[x.dtype], qweight.data_ptr(), out_features, n_groups, group_size,
            None if act_scale is None else act_scale.data_ptr(), None if bias is None else bias.data_ptr(),
            y.data_ptr(), _isa_code(os.environ.get("AWQTENSOR_CPU_ISA")),
        )
        if rc:
            raise MemoryError("awqtensor CPU kernel: out of memory for its activation buffer") if rc == -2 \
                else RuntimeError(f"awqtensor CPU kernel refused the call (code {rc})")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def dequantize(qweight: torch.Tensor, n_groups: int, group_size: int, shape: tuple[int, int],
               dtype: torch.dtype, check: bool = True) -> torch.Tensor:
    """The dense [N, K] weight a "cpu_blocks" ``qweight`` stands for, in fp32 or bf16
    (``check``: as in ``linear``)."""
    n, k = shape
    if check:
        reference.check_layout("awqtensor cpu_kernel.dequantize", qweight, n, n_groups, group_size, k, "in_features",
                               "cpu_blocks")
        _check_cpu("awqtensor cpu_kernel.dequantize", qweight=qweight)
    out = torch.empty(n, k, dtype=dtype)
    if not qweight.is_contiguous():
        qweight = qweight.contiguous()
    rc = _load()[0].awq_cpu_dequantize(qweight.data_ptr(), n, k, n_groups, group_size, DTYPES[dtype],
                                       out.data_ptr(), _isa_code(os.environ.get("AWQTENSOR_CPU_ISA")))
    if rc:
        raise ValueError(f"awqtensor CPU kernel: cannot dequantize to {dtype} (fp32 or bf16 only)")
    return out


def fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as torch detects them)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def _chunk(dtype: torch.dtype) -> int:
    """DENSE_CHUNK's bytes (it counts bf16 elements) in elements of ``dtype``."""
    return DENSE_CHUNK * 2 // dtype.itemsize


def _default_route() -> dict:
    if fast_bf16_matmul():
        return {"min_m": DENSE_MIN_M, "min_macs": DENSE_MIN_MACS, "chunk": _chunk(torch.bfloat16), "dtype": torch.bfloat16}
    return {"min_m": FP32_DENSE_MIN_M, "min_macs": FP32_DENSE_MIN_MACS, "chunk": _chunk(torch.float32),
            "dtype": torch.float32}


_dense = _default_route()


def _dense_thresholds() -> tuple[int, int, int, int]:
    """(min M, min multiply-adds, chunk elements, dtype code) for the C++ op; M = 0 means never."""
    return (_dense["min_m"] or 0, _dense["min_macs"], _dense["chunk"], DTYPES[_dense["dtype"]])


def dense_route(min_m: int | None, min_macs: int = DENSE_MIN_MACS, chunk: int | None = None,
                dtype: torch.dtype | None = None) -> dict:
    """From which call size the C++ op's dense route serves "cpu_blocks" weights: ``min_m``
    rows and ``min_macs`` multiply-adds (``min_m=None``: never), dequantizing ``chunk``
    weight elements at a time (default: a quarter of the last-level cache) to ``dtype``
    (bf16 or fp32; default: what it was). The default is bf16 where the CPU has native
    bf16 matmuls (``fast_bf16_matmul``), else fp32 from larger M. Returns the previous
    settings (``dense_route(**old)`` restores)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be at least 1 element, got {chunk}")
    if dtype not in (None, torch.bfloat16, torch.float32):
        raise ValueError(f"the dense route dequantizes to torch.bfloat16 or torch.float32, not {dtype}")
    old = dict(_dense)
    dtype = dtype or old["dtype"]
    chunk = chunk or _chunk(dtype)
    _dense.update(min_m=min_m, min_macs=min_macs, chunk=chunk, dtype=dtype)
    lib = _load()[0]
    if lib is not None and hasattr(lib, "awq_cpu_set_dense_route"):
        lib.awq_cpu_set_dense_route(*_dense_thresholds())
    return old


def dense_unsuitable(m: int, n: int, k: int) -> str | None:
    """Why the C++ op would not take the dense route for an [m, k] x [n, k] call, or None."""
    if not binding():
        return "the dense route lives in the C++ op, which is not built here (ctypes mode)"
    disabled = {"cpu_dense", "cpu_dense_bf16"} & set(os.environ.get("AWQTENSOR_DISABLE", "").split(","))
    if disabled:
        return f"disabled by AWQTENSOR_DISABLE={disabled.pop()}"
    if _dense["min_m"] is None:
        return "off (dense_route(None))"
    if m < _dense["min_m"] or m * n * k < _dense["min_macs"]:
        return f"M={m}, {m * n * k} multiply-adds: below {_dense['min_m']} rows or {_dense['min_macs']}"
    return None
