"""Int4 weight layouts: one canonical layout for storage, one per backend for kernels.

Canonical layout, ``"plain"`` (what checkpoints hold and every device can read):
    ``qweight`` uint8 [N, ceil(K_padded / 2)], row n = output channel n; byte j holds
    column 2j in its low nibble and column 2j + 1 in its high nibble. ``K_padded`` is
    ``n_groups * group_size``; see ``awqtensor.quant`` for what the padding holds.

Backend layouts are produced once, when a weight lands on a device or changes dtype
(``choose_packing``), never per call:

* ``"cpu_int4pack"``: the layout of ``aten._weight_int4pack_mm_for_cpu`` (torch's int4 CPU
  kernel; fastest with bf16 activations, and still faster than dequantize-then-matmul
  with fp32 and fp16). Its nibble order is torch's business and varies with the CPU's
  vector width, so going back to "plain" recovers it by probing the packer instead of
  hard-coding it: blocks of rows, k-major, a fixed nibble order per block size, each
  probed once with a tiny tensor. The kernel takes groups of 32..256 columns; a larger group (per-channel)
  runs as several kernel groups sharing one scale, which changes nothing numerically.
* ``"cpu_blocks"``: the layout of awqtensor's own CPU kernel (``awqtensor/ops/cpu_kernel.cpp``),
  uint8 [N, n_groups * (8 + 16 * nb)] with ``nb = ceil(group_size / 32)``: per row, per
  group, an fp32 ``scale`` and fp32 ``scale * zero`` (so the kernel reads one sequential
  stream and never converts), then ``nb`` blocks of 16 bytes, byte i holding column i of
  the block in its low nibble and column i + 16 in its high nibble (a vector unpacks 32
  codes in column order with one shift and two masks, on x86 and ARM alike). A group
  that is not a multiple of 32 columns (per-channel) is padded with code 0 to the block;
  the kernel zeroes the activations there. Chosen on the CPU whenever that kernel builds
  and loads; the canonical ``scales``/``zeros`` stay alongside, as in every layout.
* ``"triton"``: int32 [K_padded / 8, N], the "plain" bytes read as little-endian int32
  (eight columns per word, column 8w + i in bits 4i..4i+3) and transposed, so the Triton
  kernels (``awqtensor.ops.triton_kernels``) load weight tiles as coalesced rows. Used on
  CUDA, and on the CPU when ``AWQTENSOR_BACKEND=triton`` (with ``TRITON_INTERPRET=1``,
  to test the kernels without a GPU). Needs a group size that is a multiple of 16.

``scales`` and ``zeros`` stay in their canonical [N, n_groups] shape in every layout.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

from .quant import SYMMETRIC_ZERO

PLAIN = "plain"
CPU_INT4PACK = "cpu_int4pack"
TRITON = "triton"
CPU_BLOCKS = "cpu_blocks"
PACKINGS = (PLAIN, CPU_INT4PACK, TRITON, CPU_BLOCKS)
CPU_INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


def qweight_layout(packing_format: str, n: int, n_groups: int, group_size: int) -> tuple[tuple[int, int], torch.dtype]:
    """(shape, dtype) of the ``qweight`` of an [n, n_groups * group_size] weight in
    ``packing_format``; ValueError for an unknown one."""
    k_padded = n_groups * group_size
    if packing_format in (PLAIN, CPU_INT4PACK):  # cpu_int4pack's group sizes make k_padded even
        return (n, (k_padded + 1) // 2), torch.uint8
    if packing_format == TRITON:
        return (k_padded // 8, n), torch.int32
    if packing_format == CPU_BLOCKS:
        return (n, n_groups * (8 + 16 * _blocks_per_group(group_size))), torch.uint8
    raise ValueError(f"unknown packing_format {packing_format!r}; known: {PACKINGS}")


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, L] (0..15) -> uint8 [N, ceil(L / 2)], low nibble first."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: uint8 [N, ceil(L / 2)] -> uint8 [N, L]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :length]


def cpu_int4pack_group_size(group_size: int) -> int | None:
    """The kernel group size that tiles ``group_size`` (largest first), or None."""
    return next((g for g in reversed(CPU_INT4PACK_GROUP_SIZES) if group_size % g == 0), None)


def cpu_int4pack_unsupported(n: int, group_size: int, dtype: torch.dtype) -> str | None:
    """Why torch's int4 CPU kernel cannot serve this weight, or None if it can."""
    if "cpu_int4pack_mm" in os.environ.get("AWQTENSOR_DISABLE", "").split(","):
        return "disabled by AWQTENSOR_DISABLE=cpu_int4pack_mm"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"needs float activations, the weight is {dtype}"
    if cpu_int4pack_group_size(group_size) is None:
        return f"needs group_size a multiple of 32, got {group_size}"
    if n % 16:
        return f"needs out_features divisible by 16, got {n}"
    return None


def triton_unsupported(device: torch.device, group_size: int, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot serve this weight on ``device``, or None if they can."""
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get("AWQTENSOR_BACKEND") != "triton":
        return "CPU tensors use the CPU kernels unless AWQTENSOR_BACKEND=triton"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton path for {device.type} tensors"
    if "triton" in os.environ.get("AWQTENSOR_DISABLE", "").split(","):
        return "disabled by AWQTENSOR_DISABLE=triton"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"needs float activations, the weight is {dtype}"
    if group_size % 16:
        return f"needs group_size a multiple of 16, got {group_size}"
    if sys.byteorder != "little":
        return "the layout reads bytes as little-endian int32"
    return None


def cpu_blocks_unsupported(dtype: torch.dtype) -> str | None:
    """Why awqtensor's CPU kernel cannot serve this weight, or None if it can (building
    the kernel on first call; a failed build warns once and answers why)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"needs float activations, the weight is {dtype}"
    from .ops import cpu_kernel  # the kernel module, loaded only when a weight lands on the CPU

    return cpu_kernel.unavailable()


def choose_packing(device: torch.device, dtype: torch.dtype, n: int, group_size: int) -> str:
    """The layout the kernel for (device, dtype) reads; "plain" when no backend layout fits."""
    if triton_unsupported(device, group_size, dtype) is None:
        return TRITON
    if torch.device(device).type == "cpu" and cpu_blocks_unsupported(dtype) is None:
        return CPU_BLOCKS
    if torch.device(device).type == "cpu" and cpu_int4pack_unsupported(n, group_size, dtype) is None:
        return CPU_INT4PACK
    return PLAIN


@functools.cache
def _cpu_int4pack_block_rows() -> int:
    """Rows per block of torch's layout (its vector width x 4): packed [N, K] is stored as
    blocks of this many rows, each k-major. Found as the number of nibbles that precede
    the first nibble of column k = 1 in a probe."""
    probe = torch.zeros(128, 2, dtype=torch.int32)
    probe[:, 1] = 1
    nibbles = unpack_nibbles(_to_cpu_int4pack_codes(probe).reshape(1, -1), 256)[0]
    return int((nibbles == 1).nonzero()[0])


@functools.cache
def _cpu_int4pack_slot_rows(block_rows: int) -> torch.Tensor:
    """For a block of ``block_rows`` rows: the row held by each nibble (low nibble of byte
    0, high nibble of byte 0, ...) of one k's bytes. Probed with the row index, 4 bits at a time."""
    rows = torch.arange(block_rows, dtype=torch.int32)
    slot_rows = torch.zeros(block_rows, dtype=torch.int64)
    for shift in (0, 4):
        digit = ((rows >> shift) & 15).unsqueeze(1).expand(block_rows, 2).contiguous()
        packed = _to_cpu_int4pack_codes(digit).reshape(1, -1)
        slot_rows |= unpack_nibbles(packed, 2 * block_rows)[0, :block_rows].to(torch.int64) << shift
    return slot_rows


def _to_cpu_int4pack_codes(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def cpu_int4pack_codes(packed: torch.Tensor, k_padded: int) -> torch.Tensor:
    """uint8 codes [N, k_padded] of a ``cpu_int4pack`` weight, in a few vectorized passes."""
    n = packed.shape[0]
    block = _cpu_int4pack_block_rows()
    flat = packed.reshape(-1)
    pieces, offset = [], 0
    for count, rows in ((n // block, block), (1 if n % block else 0, n % block)):
        if not count:
            continue
        size = count * k_padded * rows // 2
        nibbles = unpack_nibbles(flat[offset : offset + size].reshape(-1, rows // 2), rows)
        by_row = torch.empty_like(nibbles)
        by_row[:, _cpu_int4pack_slot_rows(rows)] = nibbles  # [count * K, rows]
        pieces.append(by_row.reshape(count, k_padded, rows).transpose(1, 2).reshape(count * rows, k_padded))
        offset += size
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous()


def _blocks_per_group(group_size: int) -> int:
    return -(-group_size // 32)


def to_cpu_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """uint8 codes [N, k_padded] and their canonical scales/zeros -> the "cpu_blocks" bytes."""
    n, n_groups = scales.shape
    group_size = codes.shape[1] // n_groups
    nb = _blocks_per_group(group_size)
    grouped = codes.reshape(n, n_groups, group_size).to(torch.uint8)
    if nb * 32 > group_size:
        grouped = torch.nn.functional.pad(grouped, (0, nb * 32 - group_size))
    halves = grouped.reshape(n, n_groups, nb, 2, 16)
    blocks = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).reshape(n, n_groups, nb * 16)
    s = scales.float()
    z = torch.full_like(s, SYMMETRIC_ZERO) if zeros is None else zeros.float()
    header = torch.stack((s, s * z), dim=-1).contiguous().view(torch.uint8)  # [N, G, 8]
    return torch.cat((header, blocks), dim=-1).reshape(n, -1).contiguous()


def cpu_blocks_codes(packed: torch.Tensor, k_padded: int, n_groups: int) -> torch.Tensor:
    """uint8 codes [N, k_padded] of a "cpu_blocks" weight (its headers dropped)."""
    n = packed.shape[0]
    group_size = k_padded // n_groups
    nb = _blocks_per_group(group_size)
    blocks = packed.reshape(n, n_groups, 8 + 16 * nb)[:, :, 8:].reshape(n, n_groups, nb, 1, 16)
    halves = torch.cat((blocks & 0x0F, blocks >> 4), dim=3)  # [N, G, nb, 2, 16]
    return halves.reshape(n, n_groups, nb * 32)[:, :, :group_size].reshape(n, k_padded)


def codes(qweight: torch.Tensor, k_padded: int, packing_format: str, n_groups: int | None = None) -> torch.Tensor:
    """uint8 codes [N, k_padded] of a weight in any layout ("cpu_blocks" needs ``n_groups``)."""
    if packing_format == PLAIN:
        return unpack_nibbles(qweight, k_padded)
    if packing_format == CPU_INT4PACK:
        return cpu_int4pack_codes(qweight, k_padded)
    if packing_format == TRITON:
        return unpack_nibbles(qweight.t().contiguous().view(torch.uint8), k_padded)
    if packing_format == CPU_BLOCKS:
        if n_groups is None:
            raise ValueError("reading a 'cpu_blocks' weight needs n_groups (scales.shape[1])")
        return cpu_blocks_codes(qweight, k_padded, n_groups)
    raise ValueError(f"unknown packing {packing_format!r}; known: {PACKINGS}")


def repack(
    qweight: torch.Tensor,
    k_padded: int,
    source: str,
    target: str,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convert ``qweight`` between layouts (via the codes). "cpu_blocks", as source or
    target, needs the weight's canonical ``scales`` (and ``zeros``, None when symmetric)."""
    if source == target:
        return qweight
    if (source, target) == (PLAIN, TRITON):  # the same bytes, read as int32 and transposed
        return qweight.contiguous().view(torch.int32).t().contiguous()
    if (source, target) == (TRITON, PLAIN):
        return qweight.t().contiguous().view(torch.uint8)
    if CPU_BLOCKS in (source, target) and scales is None:
        raise ValueError("repacking to or from 'cpu_blocks' needs the weight's scales (and zeros)")
    unpacked = codes(qweight, k_padded, source, None if scales is None else scales.shape[1])
    if target == CPU_BLOCKS:
        return to_cpu_blocks(unpacked, scales, zeros)
    if target == PLAIN:
        return pack_nibbles(unpacked)
    if target == CPU_INT4PACK:
        return _to_cpu_int4pack_codes(unpacked)
    if target == TRITON:
        return pack_nibbles(unpacked).view(torch.int32).t().contiguous()
    raise ValueError(f"unknown packing {target!r}; known: {PACKINGS}")
