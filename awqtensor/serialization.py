"""Quantized state dicts in safetensors: plain tensors plus JSON metadata, no pickle.

An Int4AWQTensor entry ``name`` is stored as ``name.qweight``, ``name.scales`` and, when
present, ``name.zeros`` and ``name.act_scale`` (canonical "plain" packing), and described
in the header's metadata under ``awqtensor`` as {name: {group_size, shape, bits,
zero_point, and activations when W4A8}}. Loading checks every described tensor's presence, shape and dtype and
names the one at fault. An 8-bit head (``Int8HeadTensor``) is stored as ``name.qweight``
(int8 [V, H]) and ``name.scales`` ([V]), described with ``bits`` 8.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import safetensors.torch
import torch

from . import checkpoint, packing
from .ops import w4a8
from .head import Int8HeadTensor
from .tensor import Int4AWQTensor

FORMAT_VERSION = 1
FIELDS = ("qweight", "scales", "zeros", "act_scale")
BITS = 4
# What a quantization_config may state, once for every weight or per weight.
SETTINGS = ("group_size", "bits", "zero_point")


def flatten_state_dict(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(plain tensors, safetensors metadata) for a state dict holding Int4AWQTensors."""
    tensors, described = {}, {}
    for name, value in state_dict.items():
        if isinstance(value, Int8HeadTensor):
            codes, scales = value.int8()
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = codes.contiguous(), scales.contiguous()
            described[name] = {"group_size": value.shape[1], "shape": list(value.shape), "bits": 8,
                               "zero_point": False}
        elif isinstance(value, Int4AWQTensor):
            plain = value.plain_qweight()
            for field, tensor in zip(FIELDS, (plain, value.scales, value.zeros, value.act_scale)):
                if tensor is not None:
                    tensors[f"{name}.{field}"] = tensor.detach().contiguous()
            described[name] = {"group_size": value.group_size, "shape": list(value.shape), "bits": BITS,
                               "zero_point": value.zeros is not None}
            if value.activations is not None:  # W4A8; absent means weight-only (older files too)
                described[name]["activations"] = value.activations
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
        if info.get("bits", BITS) == 8:
            q, scales = fields["qweight"], fields["scales"]
            if tuple(q.shape) != (n, k) or q.dtype != torch.int8 or tuple(scales.shape) != (n,):
                raise ValueError(f"{name}: an 8-bit [{n}, {k}] weight needs int8 qweight [{n}, {k}] and scales "
                                 f"[{n}], got {q.dtype} {tuple(q.shape)} and {tuple(scales.shape)}")
            state_dict[name] = Int8HeadTensor.from_int8(q, scales)
            continue
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
        activations = info.get("activations")
        if activations not in w4a8.MODES:
            raise ValueError(f"{name}: activations {activations!r} is not one this awqtensor knows "
                             f"({w4a8.MODES}); upgrade awqtensor")
        state_dict[name] = Int4AWQTensor(
            fields["qweight"], fields["scales"], group_size, torch.Size((n, k)), packing.PLAIN,
            fields["zeros"], fields["act_scale"], activations,
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


def save_quantized(model, path, shard_size="5GB") -> Path:
    """Write a quantized transformers model to directory ``path``: config.json whose
    quantization_config describes every Int4AWQTensor and records every stored tensor's
    SHA-256 (the manifest), safetensors weights (sharded past ``shard_size``) and the
    tokenizer files. ``load_quantized`` reads it."""
    path = Path(path)
    state = checkpoint.drop_tied(model, dict(model.state_dict()))
    quantized = (Int4AWQTensor, Int8HeadTensor)
    if not any(isinstance(v, quantized) for v in state.values()):
        raise ValueError("the model has no Int4AWQTensor weights; quantize it with awqtensor.quantize_ first")
    nonfinite = checkpoint.nonfinite_scales(state)
    if nonfinite:
        raise ValueError(f"the model's {nonfinite[0]} holds inf or nan, which no checkpoint should keep; "
                         f"re-quantize that Linear from finite float weights")
    tensors, metadata = flatten_state_dict(state)
    config = model.config.to_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    config["quantization_config"] = {
        "quant_method": "awqtensor", "format_version": FORMAT_VERSION, "weights": json.loads(metadata["awqtensor"]),
        "modules_not_converted": [n for n in linears if not isinstance(model.get_submodule(n).weight, quantized)],
        "sha256": {name: checkpoint.sha256(t) for name, t in tensors.items()}}
    checkpoint.write_tensors(tensors, path, shard_size, metadata=metadata, desc="saving")
    checkpoint.write_config(config, path)
    checkpoint.copy_side_files(model, path)
    return path


def _check_settings(qc: dict, header: str | None, tensors: dict, path) -> None:
    """Every setting config.json's quantization_config states, for all weights or per
    weight, must be the one the stored tensors were saved with (group size and shape
    from their safetensors header, zero point from the zeros being there); a disagreement
    names both values rather than quietly trusting one."""
    try:
        saved = json.loads(header or "{}")
    except json.JSONDecodeError:
        raise ValueError(f"{path}: the safetensors header's awqtensor metadata is not valid JSON; the checkpoint "
                         f"is corrupted: re-save or re-download it") from None
    weights = qc.get("weights", {})
    unlisted = sorted(set(saved) - set(weights))
    if unlisted:
        raise ValueError(f"{path}: the stored tensors hold quantized {unlisted[0]}, which config.json's "
                         f"quantization_config does not list; restore config.json or re-save the model")
    for name, info in weights.items():
        stored = {**saved.get(name, {}), "bits": saved.get(name, {}).get("bits", BITS),
                  "zero_point": f"{name}.zeros" in tensors}
        shape = info.get("shape") or stored.get("shape")
        for key, value in [*((key, qc[key]) for key in SETTINGS if key in qc), *info.items()]:
            if key == "group_size" and value == -1 and shape:
                value = shape[1]  # -1: one group per row
            if key in stored and value != stored[key]:
                raise ValueError(f"{path}: config.json's quantization_config says {key} {value} for {name}, "
                                 f"but its stored tensors have {key} {stored[key]}; correct config.json "
                                 f"or re-save the model")


def load_quantized(path, dtype: torch.dtype | None = None, device="cpu", verify: bool = True):
    """The transformers model ``save_quantized`` wrote, Int4AWQTensor weights repacked once
    for ``device`` and ``dtype`` (default: the config's).

    ``verify`` checks every tensor against the SHA-256 config.json records for it (about
    a second per GB); ``verify=False`` skips that. Scales must be finite and the config's
    quantization settings must match the stored tensors either way."""
    path = Path(path)
    config = checkpoint.read_config(path)
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "awqtensor":
        method = qc.get("quant_method")
        hint = "; it is AutoAWQ's: use awqtensor.load_autoawq" if method == "awq" else ""
        raise ValueError(f"{path}: config.json's quantization_config is not awqtensor's "
                         f"(quant_method {method!r}){hint}")
    dtype = dtype or checkpoint.config_dtype(config, torch.float32)
    checksums = qc.get("sha256") if verify else None
    if verify and checksums is None:
        warnings.warn(f"{path} records no checksums (saved by an older awqtensor), so it loads unverified; "
                      f"re-save it with save_quantized to add them", stacklevel=2)
    tensors, file_metadata = checkpoint.read_tensors(path, checksums=checksums)
    _check_settings(qc, file_metadata.get("awqtensor"), tensors, path)
    metadata = {"format": "awqtensor", "version": str(qc.get("format_version", -1)),
                "awqtensor": json.dumps(qc.get("weights", {}))}
    # Int4AWQTensors repack explicitly: .to() of an unchanged dtype would keep the canonical layout.
    state = {name: (v._repacked_for("cpu", dtype) if isinstance(v, Int4AWQTensor)
                    else v.to(dtype) if v.is_floating_point() else v)
             for name, v in unflatten_state_dict(tensors, metadata).items()}
    model = checkpoint.build_model(config, dtype, state, desc=str(path))
    return model.to(device) if torch.device(device).type != "cpu" else model
