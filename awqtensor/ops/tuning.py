"""Launch configurations and M thresholds for the Triton kernels, per device.

A configuration is keyed by (kernel, M bucket, N, K, group size, dtype); the bucket is M
rounded up to a power of two, capped at 4096. The cache is one JSON file per device name
and Triton version, ``$AWQTENSOR_CACHE/triton/<device>-triton<version>.json``::

    {"thresholds": {"gemv_max_m": 16, "gemm_max_m": 1024},
     "configs": {"gemv|1|4096|4096|128|float16": {"block_n": 64, "block_k": 128, "split_k": 4}}}

Nothing is measured at import or by default: a key missing from the cache gets the
defaults below, unless ``AWQTENSOR_AUTOTUNE=1``, in which case the candidates are timed
once (``triton.testing.do_bench``) on first use and the winner is saved.
``benchmarks/gpu_kernels.py`` measures the thresholds and writes them here. A cache file
that another user could have written (not ours, or writable by group or others) is
ignored with a warning; files are written private (0o600, directories 0o700).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("awqtensor")

# Measured on an H200 (benchmarks/results/gpu/, CUDA-graph timing, Llama-3-8B shapes): the gemv
# kernel wins only at M=1, and dequantize + cuBLAS beats the Triton gemm at every larger M.
DEFAULT_THRESHOLDS = {"gemv_max_m": 1, "gemm_max_m": 0}

CANDIDATES = {
    "gemv": [dict(block_n=bn, block_k=bk, split_k=sk)
             for bn in (32, 64, 128) for bk in (64, 128) for sk in (1, 2, 4, 8)],
    "gemm": [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
             for bm in (16, 32, 64, 128) for bn in (64, 128) for bk in (32, 64)
             for w, s in ((4, 2), (4, 3), (8, 3))],
}


def bucket(m: int) -> int:
    return min(4096, 1 << max(0, m - 1).bit_length())


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter"


def cache_path(device: torch.device) -> Path:
    return _cache_path(torch.device(device), os.environ.get("AWQTENSOR_CACHE", ""))


@functools.cache  # looked up on every op call: no device query or path building per call
def _cache_path(device: torch.device, root: str) -> Path:
    import triton

    root = Path(root) if root else Path.home() / ".cache" / "awqtensor"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_name(device))
    return root / "triton" / f"{name}-triton{triton.__version__}.json"


def _untrusted(path: Path) -> str | None:
    """Why another user could have written ``path`` (not ours, or writable by group or
    others), or None. The cache is data, not code, but it picks launch parameters."""
    if not hasattr(os, "getuid"):  # Windows: no POSIX owner and mode bits
        return None
    info = path.stat()
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not by you (uid {os.getuid()})"
    if info.st_mode & 0o022:
        return f"writable by group or others (mode {info.st_mode & 0o777:o}; chmod go-w {path})"
    return None


@functools.cache
def _cache(path: Path) -> dict:
    if not path.is_file():
        return {"thresholds": {}, "configs": {}}
    try:
        why = _untrusted(path)
        if why is not None:
            log.warning("ignoring the tuning cache %s: %s; defaults serve until it is fixed or AWQTENSOR_CACHE "
                        "names a private directory", path, why)
            return {"thresholds": {}, "configs": {}}
        data = json.loads(path.read_text())
        return {"thresholds": dict(data.get("thresholds", {})), "configs": dict(data.get("configs", {}))}
    except (OSError, ValueError, AttributeError) as error:
        log.warning("ignoring the unreadable tuning cache %s (%s); delete it to re-tune", path, error)
        return {"thresholds": {}, "configs": {}}


def _save(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # one per writer, 0o600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(_cache(path), indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def thresholds(device: torch.device) -> dict[str, int]:
    return {**DEFAULT_THRESHOLDS, **_cache(cache_path(device))["thresholds"]}


def set_thresholds(device: torch.device, **values: int) -> Path:
    """Record measured thresholds for ``device`` (``benchmarks/gpu_kernels.py`` does)."""
    path = cache_path(device)
    _cache(path)["thresholds"].update(values)
    _save(path)
    return path


def default_config(kernel: str, m: int, n: int, k: int) -> dict:
    if kernel == "gemv":
        # enough programs to keep a GPU busy: split K when N alone gives few of them
        split_k = 1 if n // 64 * m >= 256 else min(8, max(1, k // 1024))
        return dict(block_n=64, block_k=128, split_k=split_k)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return dict(block_m=block_m, block_n=64, block_k=64, num_warps=4, num_stages=3)


def config(kernel: str, m: int, n: int, k: int, group_size: int, dtype: torch.dtype, device: torch.device,
           run=None) -> dict:
    """The launch parameters for this call; ``run(config)`` launches it, for tuning."""
    key = f"{kernel}|{bucket(m)}|{n}|{k}|{group_size}|{str(dtype).removeprefix('torch.')}"
    path = cache_path(device)
    cached = _cache(path)["configs"].get(key)
    if cached is not None:
        return cached
    if run is None or os.environ.get("AWQTENSOR_AUTOTUNE") != "1" or torch.device(device).type != "cuda":
        return default_config(kernel, m, n, k)
    from triton.testing import do_bench

    timings = {}
    for candidate in CANDIDATES[kernel]:
        try:
            timings[json.dumps(candidate)] = do_bench(lambda: run(candidate), warmup=5, rep=20)
        except Exception as error:  # a candidate the device cannot launch (shared memory, registers)
            log.debug("tuning %s: %s failed: %s", key, candidate, error)
    if not timings:
        return default_config(kernel, m, n, k)
    best = json.loads(min(timings, key=timings.get))
    log.info("tuned %s: %s (%.4f ms)", key, best, min(timings.values()))
    _cache(path)["configs"][key] = best
    _save(path)
    return best
