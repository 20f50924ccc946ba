"""Quantized state dicts in safetensors: plain tensors plus JSON metadata, no pickle.

An Int4AWQTensor entry ``name`` is stored as ``name.qweight``, ``name.scales`` and, when
present, ``name.zeros`` and ``name.act_scale`` (canonical "plain" packing), and described
in the header's metadata under ``awqtensor`` as {name: {group_size, shape}}. Loading
checks every described tensor's presence, shape and dtype and names the one at fault.
"""

from __future__ import annotations

import json

import safetensors.torch
import torch

from . import packing
from .tensor import Int4AWQTensor

FORMAT_VERSION = 1
FIELDS = ("qweight", "scales", "zeros", "act_scale")


def flatten_state_dict(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(plain tensors, safetensors metadata) for a state dict holding Int4AWQTensors."""
    tensors, described = {}, {}
    for name, value in state_dict.items():
        if isinstance(value, Int4AWQTensor):
            plain = value.plain_qweight()
            for field, tensor in zip(FIELDS, (plain, value.scales, value.zeros, value.act_scale)):
                if tensor is not None:
                    tensors[f"{name}.{field}"] = tensor.detach().contiguous()
            described[name] = {"group_size": value.group_size, "shape": list(value.shape)}
        else:
            tensors[name] = value.detach().contiguous()
    metadata = {"format": "awqtensor", "version": str(FORMAT_VERSION), "awqtensor": json.dumps(described)}
    return tensors, metadata


def unflatten_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict:
    """Inverse of ``flatten_state_dict``; raises ValueError naming the tensor at fault."""
    if not metadata or metadata.get("format") != "awqtensor":
        raise ValueError("not an awqtensor safetensors file: its metadata lacks format=awqtensor")
    if int(metadata.get("version", -1)) > FORMAT_VERSION:
        raise ValueError(f"file format version {metadata['version']} is newer than this awqtensor "
                         f"understands ({FORMAT_VERSION}); upgrade awqtensor")
    tensors = dict(tensors)
    state_dict = {}
    for name, info in json.loads(metadata["awqtensor"]).items():
        fields = {f: tensors.pop(f"{name}.{f}", None) for f in FIELDS}
        for required in ("qweight", "scales"):
            if fields[required] is None:
                raise ValueError(f"{name}.{required} is missing from the file")
        n, k = info["shape"]
        group_size = info["group_size"]
        groups = -(-k // group_size)
        expected = {"qweight": ((n, -(-groups * group_size // 2)), torch.uint8),
                    "scales": ((n, groups), None), "zeros": ((n, groups), torch.uint8), "act_scale": ((k,), None)}
        for field, (shape, dtype) in expected.items():
            t = fields[field]
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}.{field} has shape {tuple(t.shape)}, expected {shape} for a "
                                 f"[{n}, {k}] weight with group_size {group_size}")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{name}.{field} has dtype {t.dtype}, expected {dtype}")
        state_dict[name] = Int4AWQTensor(
            fields["qweight"], fields["scales"], group_size, torch.Size((n, k)), packing.PLAIN,
            fields["zeros"], fields["act_scale"],
        )
    state_dict.update(tensors)
    return state_dict


def save_file(state_dict: dict, path) -> None:
    tensors, metadata = flatten_state_dict(state_dict)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def load_file(path, device: str = "cpu") -> dict:
    """A state dict with Int4AWQTensors in the canonical layout; load_state_dict repacks
    them for the destination module."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it may be truncated") from err
    return unflatten_state_dict(tensors, metadata)
