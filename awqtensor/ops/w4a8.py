"""W4A8: int4 weights x int8 dynamic activations, ``awqtensor::w4a8_linear``.

The format. Activations (times ``act_scale``) are quantized per row and per weight group:
``d = absmax / 127``, ``xq = round_half_even(x * (1 / d))``; each group's products with
the int4 codes minus the zero point accumulate exactly in int32 and are rescaled in fp32
by ``d[m, g] * scale[n, g]``. Per row *and group* rather than per row: the group's
rescale is needed for the weight's scale anyway, so the finer activation scale costs
nothing, and one outlier channel (AWQ's ``act_scale`` makes the salient ones larger)
then coarsens only its own group's 64 or 128 values, not the whole row's. The float
function this computes is ``fake_quantize_activations(x * act_scale) @ dequantize(W).T``,
except for rows holding NaN or inf, which int8 cannot carry: the CPU GEMM computes those
on the dequantized weight in fp32, so they come out as through ``F.linear``.

The switch (torchao 0.8's prefill idea): a call with M = numel / K rows (not
``x.shape[1]``, which is wrong for 2-D inputs) at or above the device's threshold runs
the W4A8 GEMM, where it is compute-bound and int8 doubles the multiply rate; smaller
calls, where the weight's bytes are the cost, run weight-only (the ``int4_linear`` op:
on the CPU that kernel already reads int8 activations, per 32 columns). ``reasons(m,
device)`` says which and why. Thresholds come from ``benchmarks/w4a8_route.py``
(CPU, per micro-kernel: a window of M) and are defaults, not measurements, on CUDA.

Where no W4A8 GEMM serves a weight's layout and device, calls run weight-only, with one
warning: never an error mid-model.
"""

from __future__ import annotations

import ctypes
import os
import warnings

import torch
import torch.nn.functional as F

from .. import packing
from . import reference

MODES = (None, "int8")  # the ``activations=`` a config and an Int4AWQTensor take
CPU_KERNELS = ("scalar", "avx2", "avx512_vnni", "amx", "neon_dotprod")  # the CPU GEMM's micro-kernels, by code
# The rows [min_m, max_m) where the CPU GEMM beats weight-only, per micro-kernel (None:
# never; max None: no limit), measured by benchmarks/w4a8_route.py on our AMX Xeon
# (benchmarks/results/README.md). From M = 512 torch's AMX-bf16 matmul (the weight-only
# dense route) is as fast: the per-group fp32 rescale costs about what AMX's int8
# products do, and grows with M like them.
# AVX512-VNNI and AVX2 lost to weight-only at every M measured there (on CPUs without
# native bf16 they may not: unmeasured, so off).
CPU_WINDOW = {"amx": (16, 512), "avx512_vnni": (None, None), "avx2": (None, None), "scalar": (None, None),
              "neon_dotprod": (None, None)}  # ARM: tested under qemu, never timed
# Under TRITON_INTERPRET=1 (the tests) calls of at least CUDA_MIN_M rows take the Triton W4A8
# GEMM. On a real GPU it stays off: on an H200 it ran at 0.06-0.15x of an fp16 matmul at every
# M, slower than the weight-only route (benchmarks/results/gpu/, CUDA-graph timing).
CUDA_MIN_M = 64
CUDA_W4A8 = False


def check_mode(owner: str, activations) -> None:
    if activations not in MODES:
        raise ValueError(f"{owner}: activations must be None (weight-only, activations stay in float) or "
                         f"'int8' (W4A8: int8 dynamic activations), got {activations!r}")


def _disabled() -> set[str]:
    return set(os.environ.get("AWQTENSOR_DISABLE", "").split(","))


def quantize_activations(x2: torch.Tensor, group_size: int, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [M, n_groups * group_size], fp32 scales [M, n_groups]) of ``x2`` [M, K],
    the padded columns zero; the arithmetic every W4A8 kernel uses."""
    m, k = x2.shape
    xg = F.pad(x2.float(), (0, n_groups * group_size - k)).reshape(m, n_groups, group_size)
    d = xg.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xg * inv.unsqueeze(-1))  # half to even, as the kernels round
    return q.to(torch.int8).reshape(m, -1), d


def fake_quantize_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float values the W4A8 format gives ``x`` [..., K] (already times act_scale)."""
    k = x.shape[-1]
    group_size = k if group_size in (-1, None) else group_size
    n_groups = -(-k // group_size)
    q, d = quantize_activations(x.reshape(-1, k), group_size, n_groups)
    out = (q.float().reshape(-1, n_groups, group_size) * d.unsqueeze(-1)).reshape(-1, n_groups * group_size)
    return out[:, :k].reshape(x.shape).to(x.dtype)


# ---- the CPU GEMM's route ----

def _lib():
    from . import cpu_kernel

    lib = cpu_kernel._load()[0]
    return lib if lib is not None and hasattr(lib, "awq_cpu_set_w4a8_route") else None


def cpu_kernels(lib=None) -> list[str]:
    """The micro-kernels this CPU runs (empty without the C++ op), best last (x86 and ARM
    never share one but the scalar)."""
    lib = lib or _lib()
    return [] if lib is None else [name for code, name in enumerate(CPU_KERNELS)
                                   if lib.awq_cpu_w4a8_kernel_supported(code)]


_route = {"min_m": None, "max_m": None, "kernel": None}


def install(lib) -> None:
    """The default route, set by cpu_kernel when it loads the C++ op: the best micro-kernel
    here, in its measured CPU_WINDOW."""
    lib.awq_cpu_w4a8_kernel_supported.argtypes = [ctypes.c_int64]
    lib.awq_cpu_set_w4a8_route.argtypes = [ctypes.c_int64] * 3
    supported = cpu_kernels(lib)
    min_m, max_m = CPU_WINDOW[supported[-1]] if supported else (None, None)
    _route.update(min_m=min_m, max_m=max_m, kernel=None)
    lib.awq_cpu_set_w4a8_route(min_m or 0, max_m or 0, -1)


def cpu_route(min_m: int | None = None, max_m: int | None = None, kernel: str | None = None) -> dict:
    """Set which calls the CPU runs through the W4A8 GEMM: M in [``min_m``, ``max_m``)
    (``min_m=None``: never; ``max_m=None``: no upper limit), with micro-kernel ``kernel``
    (None: the best this CPU has). Returns the previous settings (``cpu_route(**old)``
    restores)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the W4A8 GEMM lives in awqtensor's C++ CPU op, which is not built here")
    if kernel is not None and kernel not in cpu_kernels(lib):
        raise ValueError(f"kernel must be None or one this CPU runs, {cpu_kernels(lib)}; got {kernel!r}")
    for name, value in (("min_m", min_m), ("max_m", max_m)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    old = dict(_route)
    _route.update(min_m=min_m, max_m=max_m, kernel=kernel)
    lib.awq_cpu_set_w4a8_route(min_m or 0, max_m or 0, -1 if kernel is None else CPU_KERNELS.index(kernel))
    return old


def reasons(m: int, device: torch.device, group_size: int, packing_format: str) -> dict[str, str | None]:
    """Why each path cannot serve an M-row W4A8 call (None: it can); the first of
    ("w4a8", "weight_only") that can, runs."""
    device = torch.device(device)
    why = {"w4a8": None, "weight_only": None}
    switches = {"w4a8", "cpu_w4a8"} if device.type == "cpu" else {"w4a8"}
    if switches & _disabled():
        why["w4a8"] = "disabled by AWQTENSOR_DISABLE"
    elif packing_format == packing.TRITON:
        if not (device.type == "cuda" or _interpreting()):
            why["w4a8"] = "the 'triton' layout runs on CUDA (or under TRITON_INTERPRET=1)"
        elif device.type == "cuda" and not CUDA_W4A8:
            why["w4a8"] = ("the Triton W4A8 GEMM measured slower than weight-only on an H200 (0.06-0.15x of "
                           "an fp16 matmul): off until it is fast")
        elif m < CUDA_MIN_M:
            why["w4a8"] = f"M={m} < {CUDA_MIN_M}: weight-only is as fast where the weight's bytes are the cost"
    elif device.type == "cpu":
        why["w4a8"] = _cpu_unsuitable(m, group_size, packing_format)
    else:
        why["w4a8"] = f"no W4A8 kernel for the {packing_format!r} layout on {device.type}"
    return why


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cpu_unsuitable(m: int, group_size: int, packing_format: str) -> str | None:
    if packing_format != packing.CPU_BLOCKS:
        return f"the weight is in the {packing_format!r} layout, not 'cpu_blocks'"
    if "cpu_blocks" in _disabled():
        return "disabled by AWQTENSOR_DISABLE=cpu_blocks (the C++ op hands the call to the reference)"
    route = _route
    if _lib() is None:
        return "the W4A8 GEMM lives in the C++ op, which is not built here"
    if group_size % 32:
        return f"group_size {group_size} is not a multiple of 32"
    if route["min_m"] is None:
        return (f"no W4A8 micro-kernel measured faster than weight-only on this CPU "
                f"(it has {cpu_kernels()}; see CPU_WINDOW)")
    if m < route["min_m"]:
        return f"M={m} < {route['min_m']}: the weight-only kernel is faster where the weight's bytes are the cost"
    if route["max_m"] is not None and m >= route["max_m"]:
        return f"M={m} >= {route['max_m']}: the weight-only dense route (native bf16 matmul) is faster here"
    return None


def unavailable(device: torch.device, packing_format: str, group_size: int) -> str | None:
    """Why W4A8 weights on ``device`` would never run the W4A8 GEMM, or None."""
    device = torch.device(device)
    if (device.type == "cpu" and packing_format == packing.CPU_BLOCKS and _lib() is not None and group_size % 32 == 0
            and "cpu_blocks" not in _disabled()):
        return None if _route["min_m"] is not None else _cpu_unsuitable(1, group_size, packing_format)
    return reasons(1 << 20, device, group_size, packing_format)["w4a8"]


_warned: set = set()


def warn_unavailable(device, packing_format: str, group_size: int) -> None:
    """One warning per reason that W4A8 weights here run weight-only."""
    why = unavailable(device, packing_format, group_size)
    if why is not None and why not in _warned:
        _warned.add(why)
        warnings.warn(f"awqtensor: activations='int8' weights run weight-only here ({why}); the outputs are "
                      f"as accurate or more, but prefill is not sped up by int8", RuntimeWarning, stacklevel=3)


# ---- Python implementations (layouts and devices the C++ op does not serve) ----

def w4a8_linear(x, qweight, scales, zeros, act_scale, bias, group_size, packing_format):
    """CompositeExplicitAutograd: the Triton GEMM for the "triton" layout, else weight-only
    (with one warning where no W4A8 GEMM serves this layout and device)."""
    reference.check_linear_args("awqtensor::w4a8_linear", x, qweight, scales, zeros, act_scale, bias, group_size,
                                packing_format)
    k = x.shape[-1]
    m = x.numel() // k
    why = reasons(m, x.device, group_size, packing_format)["w4a8"]
    if m and why is None:
        from . import gpu

        return gpu.w4a8_linear(x, qweight, scales, zeros, act_scale, bias, group_size)
    warn_unavailable(x.device, packing_format, group_size)
    return torch.ops.awqtensor.int4_linear.default(x, qweight, scales, zeros, act_scale, bias, group_size,
                                                   packing_format)
