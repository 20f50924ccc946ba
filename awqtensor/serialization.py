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
    try:
        described = json.loads(metadata.get("awqtensor", "{}"))
    except (TypeError, json.JSONDecodeError):
        described = None
    if not isinstance(described, dict):
        raise ValueError("the awqtensor metadata describing the quantized weights is not a JSON mapping; the "
                         "checkpoint is corrupted: re-save or re-download it")
    for name, info in described.items():
        _check_description(name, info)
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
            state_dict[name] = _built(name, Int8HeadTensor.from_int8, q, scales)
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
        state_dict[name] = _built(name, Int4AWQTensor, fields["qweight"], fields["scales"], group_size,
                                  torch.Size((n, k)), packing.PLAIN, fields["zeros"], fields["act_scale"], activations)
    state_dict.update(tensors)
    return state_dict


def _built(name: str, make, *args):
    """``make(*args)``, its validation error prefixed with the weight's name."""
    try:
        return make(*args)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name}: {err}; the checkpoint is corrupted or was saved from a broken model: "
                         f"re-quantize and re-save it") from err


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_description(name: str, info) -> None:
    """ValueError naming ``name`` unless its description has the fields loading reads."""
    problem = None
    if not isinstance(info, dict):
        problem = f"is {type(info).__name__}, not a mapping"
    elif not (isinstance(info.get("shape"), list) and len(info["shape"]) == 2 and all(map(_positive_int, info["shape"]))):
        problem = f"has shape {info.get('shape')!r}, not [out_features, in_features]"
    elif info.get("bits", BITS) not in (4, 8):
        problem = f"has bits {info.get('bits')!r}, not 4 or 8"
    elif info.get("bits", BITS) == 4 and not _positive_int(info.get("group_size")):
        problem = f"has group_size {info.get('group_size')!r}, not a positive int"
    if problem:
        raise ValueError(f"the description of {name} {problem}; the checkpoint is corrupted: re-save or re-download it")


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


# The quantization_config fields the config digest covers (the digests themselves aside).
DIGESTED_FIELDS = ("quant_method", "format_version", "weights", "modules_not_converted")


def digests(quantization_config: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The ``digests`` entry of a quantization_config: every stored tensor's digest (dtype,
    shape and bytes) and one over the config's quantization fields."""
    return {"scheme": checkpoint.DIGEST_SCHEME,
            "config": checkpoint.config_digest({k: quantization_config.get(k) for k in DIGESTED_FIELDS}),
            "tensors": {name: checkpoint.digest(t) for name, t in tensors.items()}}


def recorded_digests(qc: dict, path) -> dict[str, str]:
    """The tensor digests ``qc`` records, once its config digest is checked; ValueError
    saying how to load it otherwise when it records none (or an older awqtensor's)."""
    recorded = qc.get("digests")
    if not isinstance(recorded, dict) or recorded.get("scheme") != checkpoint.DIGEST_SCHEME:
        older = " (an older awqtensor recorded only the bytes' SHA-256)" if "sha256" in qc else ""
        raise ValueError(f"{path} records no digests of its tensors' dtype, shape and bytes{older}, so it cannot be "
                         f"verified; if you trust it, load it with load_quantized(path, verify=False) (from_pretrained: "
                         f"set AWQTENSOR_VERIFY=0) and save it again with save_quantized to add them")
    tensors = recorded.get("tensors")
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: config.json's digests hold no tensor digests; re-save the model")
    return tensors


def check_config_digest(qc: dict, path) -> None:
    """ValueError unless the quantization fields of ``qc`` are those its digest was taken of."""
    if qc["digests"].get("config") != checkpoint.config_digest({k: qc.get(k) for k in DIGESTED_FIELDS}):
        raise ValueError(f"{path}: config.json's quantization_config does not match its recorded digest; it was "
                         f"edited after saving: restore it, or re-save the model")


def save_quantized(model, path, shard_size="5GB", overwrite: bool = False) -> Path:
    """Write a quantized transformers model to directory ``path``: config.json whose
    quantization_config describes every Int4AWQTensor and records the digest of every
    stored tensor (dtype, shape and bytes) and of itself, safetensors weights (sharded
    past ``shard_size``) and the tokenizer files. ``load_quantized`` reads it.

    Everything is written beside ``path`` first and moved into place when complete, so a
    failure leaves what was there before. ``path`` may not be the directory the model was
    loaded from, nor hold a different model, unless ``overwrite``; files the checkpoint
    does not own are never removed."""
    state = checkpoint.drop_tied(model, dict(model.state_dict()))
    quantized = (Int4AWQTensor, Int8HeadTensor)
    if not any(isinstance(v, quantized) for v in state.values()):
        raise ValueError("the model has no Int4AWQTensor weights; quantize it with awqtensor.quantize_ first")
    nonfinite = checkpoint.nonfinite_scales(state)
    if nonfinite:
        raise ValueError(f"the model's {nonfinite[0]} holds inf or nan, which no checkpoint should keep; "
                         f"re-quantize that Linear from finite float weights")
    config = model.config.to_dict()
    path = checkpoint.check_destination(path, config, checkpoint.model_source(model), overwrite)
    tensors, metadata = flatten_state_dict(state)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    qc = {"quant_method": "awqtensor", "format_version": FORMAT_VERSION, "weights": json.loads(metadata["awqtensor"]),
          "modules_not_converted": [n for n in linears if not isinstance(model.get_submodule(n).weight, quantized)]}
    config["quantization_config"] = {**qc, "digests": digests(qc, tensors)}
    with checkpoint.staged_directory(path) as stage:
        checkpoint.write_tensors(tensors, stage, shard_size, metadata=metadata, desc="saving")
        checkpoint.copy_side_files(model, stage)
        checkpoint.write_config(config, stage)
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
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: the safetensors header's awqtensor metadata is not a JSON mapping; the "
                         f"checkpoint is corrupted: re-save or re-download it")
    for name, info in [*saved.items(), *weights.items()]:
        if not isinstance(info, dict):
            raise ValueError(f"{path}: the description of {name} is not a mapping; the checkpoint is corrupted: "
                             f"re-save or re-download it")
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

    ``verify`` checks every tensor's dtype, shape and bytes, and config.json's quantization
    fields, against the digests config.json records (about a second per GB), and refuses a
    checkpoint that records none. This catches corruption and accidental edits, not an
    author who rewrites both the data and the digests. ``verify=False`` skips it. Scales
    must be finite and the config's quantization settings must match the stored tensors
    either way."""
    path = Path(path)
    config = checkpoint.read_config(path)
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "awqtensor":
        method = qc.get("quant_method")
        hint = "; it is AutoAWQ's: use awqtensor.load_autoawq" if method == "awq" else ""
        raise ValueError(f"{path}: config.json's quantization_config is not awqtensor's "
                         f"(quant_method {method!r}){hint}")
    if not isinstance(qc.get("weights", {}), dict):
        raise ValueError(f"{path}: config.json's quantization_config.weights is not a mapping; restore config.json")
    dtype = dtype or checkpoint.config_dtype(config, torch.float32)
    checksums = recorded_digests(qc, path) if verify else None
    tensors, file_metadata = checkpoint.read_tensors(path, checksums=checksums)
    _check_settings(qc, file_metadata.get("awqtensor"), tensors, path)
    if verify:
        check_config_digest(qc, path)
    metadata = {"format": "awqtensor", "version": str(qc.get("format_version", -1)),
                "awqtensor": json.dumps(qc.get("weights", {}))}
    # Int4AWQTensors repack explicitly: .to() of an unchanged dtype would keep the canonical layout.
    state = {name: (v._repacked_for("cpu", dtype) if isinstance(v, Int4AWQTensor)
                    else v.to(dtype) if v.is_floating_point() else v)
             for name, v in unflatten_state_dict(tensors, metadata).items()}
    model = checkpoint.build_model(config, dtype, state, desc=str(path))
    return model.to(device) if torch.device(device).type != "cpu" else model
