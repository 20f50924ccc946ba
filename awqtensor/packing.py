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

PLAIN = "plain"
CPU_INT4PACK = "cpu_int4pack"
TRITON = "triton"
PACKINGS = (PLAIN, CPU_INT4PACK, TRITON)
CPU_INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


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


def choose_packing(device: torch.device, dtype: torch.dtype, n: int, group_size: int) -> str:
    """The layout the kernel for (device, dtype) reads; "plain" when no backend layout fits."""
    if triton_unsupported(device, group_size, dtype) is None:
        return TRITON
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


def codes(qweight: torch.Tensor, k_padded: int, packing_format: str) -> torch.Tensor:
    """uint8 codes [N, k_padded] of a weight in any layout."""
    if packing_format == PLAIN:
        return unpack_nibbles(qweight, k_padded)
    if packing_format == CPU_INT4PACK:
        return cpu_int4pack_codes(qweight, k_padded)
    if packing_format == TRITON:
        return unpack_nibbles(qweight.t().contiguous().view(torch.uint8), k_padded)
    raise ValueError(f"unknown packing {packing_format!r}; known: {PACKINGS}")


def repack(qweight: torch.Tensor, k_padded: int, source: str, target: str) -> torch.Tensor:
    """Convert ``qweight`` between layouts (via the codes)."""
    if source == target:
        return qweight
    if (source, target) == (PLAIN, TRITON):  # the same bytes, read as int32 and transposed
        return qweight.contiguous().view(torch.int32).t().contiguous()
    if (source, target) == (TRITON, PLAIN):
        return qweight.t().contiguous().view(torch.uint8)
    unpacked = codes(qweight, k_padded, source)
    if target == PLAIN:
        return pack_nibbles(unpacked)
    if target == CPU_INT4PACK:
        return _to_cpu_int4pack_codes(unpacked)
    if target == TRITON:
        return pack_nibbles(unpacked).view(torch.int32).t().contiguous()
    raise ValueError(f"unknown packing {target!r}; known: {PACKINGS}")
