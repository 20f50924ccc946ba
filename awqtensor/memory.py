"""Giving memory back to the OS while a model is quantized, so the peak RSS follows what
is live rather than what was ever touched. Both helpers only release; neither can change
a value, and both do nothing where the OS call is missing (not Linux/glibc)."""

from __future__ import annotations

import ctypes
import os

import torch


def _glibc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return None


_malloc_trim = _glibc_malloc_trim()


def _libc_madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_madvise = _libc_madvise()
_MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL and nothing is released


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps the activations a mapping's
    search freed in its heap, fragmented, so without this the peak RSS grows block after
    block (measured on SmolLM2: 1047 -> 955 MB after 6 blocks) though the live set doesn't."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges this process maps from files (Linux); [] elsewhere."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def file_backed(tensors) -> list[torch.Tensor]:
    """The CPU ``tensors`` whose memory is mapped from a file (safetensors loaded with mmap)."""
    files = _file_mappings()
    return [t.detach() for t in tensors
            if t.device.type == "cpu" and any(lo <= _span(t)[0] and _span(t)[1] <= hi for lo, hi in files)]


def release_file_pages(tensors) -> int:
    """Ask the kernel to drop the resident pages of file-backed ``tensors`` (see
    ``file_backed``) and return how many bytes were named. transformers loads safetensors
    with mmap, so a block's float weights come in as file pages when the block first runs
    and would stay in the RSS to the end, though nothing reads them once the block is
    quantized (SmolLM2: 405 MB of a 1.30 GB peak). MADV_PAGEOUT only reclaims: a page
    read again is faulted back in from the file and a page written (copy-on-write) is
    kept, so it cannot change a value; only pages wholly inside a tensor are named."""
    if _madvise is None:
        return 0
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for t in tensors:
        start, end = _span(t)
        start, end = -(-start // page) * page, end // page * page
        if end > start and _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT) == 0:
            total += end - start
    return total
