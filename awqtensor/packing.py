"""Int4 weight layouts: one canonical layout for storage, one per backend for kernels.

Canonical layout, ``"plain"`` (what checkpoints hold and every device can read):
    ``qweight`` uint8 [N, ceil(K_padded / 2)], row n = output channel n; byte j holds
    column 2j in its low nibble and column 2j + 1 in its high nibble. ``K_padded`` is
    ``n_groups * group_size``; see ``awqtensor.quant`` for what the padding holds.

Backend layouts are produced once, when a weight lands on a device or changes dtype
(``choose_packing``), never per call:

* ``"cpu_int4pack"``: the layout of ``aten._weight_int4pack_mm_for_cpu`` (torch's int4 CPU
  kernel, fast with bf16 activations). Its nibble order is torch's business and may vary
  with the CPU's vector width, so ``to_plain`` recovers it by probing the packer instead
  of hard-coding it.

``scales`` and ``zeros`` stay in their canonical [N, n_groups] shape in every layout.
"""

from __future__ import annotations

import os

import torch

PLAIN = "plain"
CPU_INT4PACK = "cpu_int4pack"
PACKINGS = (PLAIN, CPU_INT4PACK)
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


def cpu_int4pack_unsupported(n: int, group_size: int, dtype: torch.dtype) -> str | None:
    """Why torch's int4 CPU kernel cannot serve this weight, or None if it can."""
    if os.environ.get("AWQTENSOR_DISABLE_CPU_INT4PACK"):
        return "disabled by AWQTENSOR_DISABLE_CPU_INT4PACK"
    if dtype != torch.bfloat16:
        return f"needs bfloat16 activations, the weight is {dtype}"
    if group_size not in CPU_INT4PACK_GROUP_SIZES:
        return f"needs group_size in {CPU_INT4PACK_GROUP_SIZES}, got {group_size}"
    if n % 16:
        return f"needs out_features divisible by 16, got {n}"
    return None


def choose_packing(device: torch.device, dtype: torch.dtype, n: int, group_size: int) -> str:
    """The layout the kernel for (device, dtype) reads; "plain" when no backend layout fits."""
    if torch.device(device).type == "cpu" and cpu_int4pack_unsupported(n, group_size, dtype) is None:
        return CPU_INT4PACK
    return PLAIN


def _to_cpu_int4pack(qweight: torch.Tensor, k_padded: int) -> torch.Tensor:
    codes = unpack_nibbles(qweight, k_padded).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)


def _from_cpu_int4pack(packed: torch.Tensor, k_padded: int) -> torch.Tensor:
    n = packed.shape[0]
    count = n * k_padded
    index = torch.arange(count, dtype=torch.int64)
    # Pack each base-16 digit of every nibble's canonical index; reading the digits back
    # at each packed position gives the permutation, whatever order the packer uses.
    source = torch.zeros(count, dtype=torch.int64)
    shift = 0
    while (1 << shift) < count:
        digit = ((index >> shift) & 15).to(torch.int32).reshape(n, k_padded)
        packed_digit = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 2)
        source |= unpack_nibbles(packed_digit, k_padded).reshape(-1).to(torch.int64) << shift
        shift += 4
    codes = torch.empty(count, dtype=torch.uint8)
    codes[source] = unpack_nibbles(packed, k_padded).reshape(-1)
    return pack_nibbles(codes.reshape(n, k_padded))


def repack(qweight: torch.Tensor, k_padded: int, source: str, target: str) -> torch.Tensor:
    """Convert ``qweight`` between layouts (via the canonical one)."""
    if source == target:
        return qweight
    if source == CPU_INT4PACK:
        qweight = _from_cpu_int4pack(qweight, k_padded)
    elif source != PLAIN:
        raise ValueError(f"unknown packing {source!r}; known: {PACKINGS}")
    if target == CPU_INT4PACK:
        return _to_cpu_int4pack(qweight, k_padded)
    if target != PLAIN:
        raise ValueError(f"unknown packing {target!r}; known: {PACKINGS}")
    return qweight
