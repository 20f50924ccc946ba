"""transformers integration: ``from_pretrained`` and ``save_pretrained`` on awqtensor checkpoints.

``import awqtensor`` registers the quantization method ``"awqtensor"`` with transformers
(``register_quantization_config`` / ``register_quantizer``), so a directory written by
``save_quantized`` (or by ``save_pretrained`` of a model loaded this way) loads with::

    import awqtensor
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("smollm2-awq")   # Int4AWQTensor weights

No pickle is involved: transformers reads the safetensors, and the loading op rebuilds each
quantized weight from its stored parts (``<name>.qweight``, ``.scales``, ``.zeros``,
``.act_scale``). Before transformers reads a byte, every weight file is checked to lie
inside the checkpoint directory and every stored tensor against the digest (dtype, shape,
bytes) config.json records; ``AWQTENSOR_VERIFY=0`` skips the digests (for a checkpoint
that records none). ``save_pretrained`` writes the same format back.

AutoAWQ checkpoints (``quant_method: "awq"``) belong to transformers' own AWQ quantizer, which
needs GPT-QModel. ``awqtensor.load_autoawq(path)`` loads them without it; after
``awqtensor.hf.route_autoawq()``, ``from_pretrained`` does too (it replaces transformers'
quantizer for ``"awq"`` in this process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import autoawq, checkpoint, serialization
from .head import Int8HeadTensor
from .tensor import Int4AWQTensor

METHOD = "awqtensor"


class AwqTensorConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an awqtensor checkpoint (written by ``save_quantized``):
    every quantized weight's settings, the Linears left in float, and each stored tensor's
    SHA-256. Not a recipe: quantize with ``awqtensor.quantize_``."""

    def __init__(self, weights: dict | None = None, modules_not_converted: list | None = None,
                 digests: dict | None = None, format_version: int = serialization.FORMAT_VERSION, **kwargs):
        self.quant_method = METHOD
        self.format_version = format_version
        self.weights = dict(weights or {})
        self.modules_not_converted = list(modules_not_converted or [])
        self.digests = digests
        self.older_checksums = "sha256" in kwargs  # an older awqtensor's bytes-only record

    def to_dict(self) -> dict:
        out = {"quant_method": METHOD, "format_version": self.format_version, "weights": self.weights,
               "modules_not_converted": self.modules_not_converted}
        if self.digests is not None:
            out["digests"] = self.digests
        return out


class _Deserialize(ConversionOps):
    """One weight's stored parts -> its Int4AWQTensor (or 8-bit head tensor)."""

    def __init__(self, quantizer: "AwqTensorQuantizer"):
        self.hf_quantizer = quantizer  # this name tells transformers to leave the stored dtypes alone

    def convert(self, input_dict, source_patterns=None, model=None, full_layer_name=None, **kwargs):
        return {full_layer_name: self.hf_quantizer.rebuild(full_layer_name, input_dict, model)}


class AwqTensorQuantizer(HfQuantizer):
    """Loads (never creates) awqtensor checkpoints inside ``from_pretrained``."""

    requires_calibration = True
    parts = serialization.FIELDS  # the stored parts of "<module>.weight"

    @property
    def serialized_names(self):
        return {"weight": [f"weight.{part}" for part in self.parts]}

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("awqtensor quantizes with awqtensor.quantize_(model, awq_config(...)) (AWQ needs "
                             "calibration data); from_pretrained only loads saved awqtensor checkpoints")

    def update_device_map(self, device_map):
        return device_map

    def get_load_operations(self):
        return {"deserialize": _Deserialize}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        directory = _checked_directory(model, checkpoint_files)
        if os.environ.get("AWQTENSOR_VERIFY", "1") == "0":
            return model
        qc = self.quantization_config.to_dict()
        if self.quantization_config.older_checksums:
            qc["sha256"] = True
        digests = serialization.recorded_digests(qc, directory)
        serialization.check_config_digest(qc, directory)
        # Every stored tensor, float ones too, against its digest, before transformers reads any.
        checkpoint.read_tensors(directory, desc="verifying", checksums=digests, keep=False)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # save_pretrained would run our loading in reverse over every "weight"; get_state_dict_and_metadata
        # already writes the stored parts.
        model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                                     if not any(isinstance(op, _Deserialize) for op in getattr(c, "operations", ()))]
        expected = self._expected()
        missing = [n for n in expected if not isinstance(_param(model, n), (Int4AWQTensor, Int8HeadTensor))]
        if missing:
            raise ValueError(f"{missing[0]} (and {len(missing) - 1} more) stayed unquantized: the checkpoint "
                             f"lacks its stored parts or names it differently; re-save it with save_quantized")
        return model

    def _expected(self) -> list[str]:
        return list(self.quantization_config.weights)

    def rebuild(self, name: str, parts: dict, model) -> torch.Tensor:
        info = self.quantization_config.weights.get(name)
        if info is None:
            raise ValueError(f"{name} has quantized parts but config.json's quantization_config does not "
                             f"describe it; restore config.json or re-save the model")
        tensors = {}
        for key, value in parts.items():
            tensors[f"{name}.{key.rpartition('weight.')[2]}"] = value[0] if isinstance(value, list) else value
        metadata = {"format": "awqtensor", "version": str(self.quantization_config.format_version),
                    "awqtensor": json.dumps({name: info})}
        weight = serialization.unflatten_state_dict(tensors, metadata)[name]
        return _for_module(weight, _param(model, name))

    def get_state_dict_and_metadata(self, model):
        state = checkpoint.drop_tied(model, dict(model.state_dict()))
        tensors, metadata = serialization.flatten_state_dict(state)
        quantized = (Int4AWQTensor, Int8HeadTensor)
        config = self.quantization_config
        config.weights = json.loads(metadata["awqtensor"])
        config.modules_not_converted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                                        and not isinstance(m.weight, quantized)]
        config.digests = serialization.digests(config.to_dict(), tensors)
        return tensors, metadata

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True  # adapters (PEFT LoRA) train on top; the int4 weights stay frozen


def _checked_directory(model, checkpoint_files) -> Path:
    """The checkpoint directory, once every weight file transformers is about to read is
    a plain file name inside it (its index is read again through ``checkpoint``, which
    refuses other names)."""
    files = [Path(f) for f in checkpoint_files or []]
    source = Path(str(getattr(model.config, "name_or_path", "") or ""))
    directory = source if str(source) and source.is_dir() else (files[0].parent if files else source)
    allowed = {Path(os.path.normpath(f)) for f in checkpoint.weight_files(directory).values()}
    for file in files:
        if Path(os.path.normpath(file)) not in allowed:
            raise ValueError(f"{file} is not a weight file of the checkpoint in {directory}; its index names files "
                             f"outside the checkpoint: nothing was read (re-save or re-download it)")
    return directory


def _param(model, name: str):
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)


def _for_module(weight, placeholder):
    """The weight in the dtype of the parameter it replaces, packed for the CPU (moving the
    model to a device repacks it again)."""
    dtype = placeholder.dtype if placeholder.is_floating_point() else weight.dtype
    if isinstance(weight, Int4AWQTensor):
        return weight._repacked_for("cpu", dtype)
    return weight.to(dtype)


register_quantization_config(METHOD)(AwqTensorConfig)
register_quantizer(METHOD)(AwqTensorQuantizer)


# AutoAWQ checkpoints through from_pretrained ------------------------------------------------

class AutoAWQQuantizer(AwqTensorQuantizer):
    """transformers' ``"awq"`` method served by awqtensor: AutoAWQ GEMM checkpoints
    (``<module>.qweight`` int32 [K, N/8], ``.qzeros``, ``.scales``) become Int4AWQTensors."""

    parts = ("qweight", "qzeros", "scales")

    @property
    def serialized_names(self):
        return {"weight": list(self.parts)}

    def validate_environment(self, *args, **kwargs):
        config = self.quantization_config
        version = str(getattr(config, "version", "gemm")).lower().rpartition(".")[2]
        if not self.pre_quantized or getattr(config, "bits", 4) != 4 or version != "gemm":
            raise ValueError(f"awqtensor reads pre-quantized 4-bit AutoAWQ GEMM checkpoints; this one is "
                             f"bits={getattr(config, 'bits', None)}, version={getattr(config, 'version', None)}")

    def _expected(self) -> list[str]:
        return []  # AutoAWQ's config does not list its Linears; checked by the load report instead

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        _checked_directory(model, checkpoint_files)  # AutoAWQ's format records no digests
        return model

    def rebuild(self, name: str, parts: dict, model) -> torch.Tensor:
        t = {key: (v[0] if isinstance(v, list) else v) for key, v in parts.items()}
        placeholder = _param(model, name)
        dtype = placeholder.dtype if placeholder.is_floating_point() else t["scales"].dtype
        return autoawq.from_gemm(t["qweight"], t["qzeros"], t["scales"], self.quantization_config.group_size,
                                 dtype, name=name)

    def get_state_dict_and_metadata(self, model):
        raise ValueError("a model loaded from an AutoAWQ checkpoint saves with awqtensor.save_autoawq(model, path) "
                         "(AutoAWQ's format) or awqtensor.save_quantized(model, path) (awqtensor's)")

    def is_serializable(self):
        return False


def route_autoawq(enable: bool = True) -> None:
    """Make ``from_pretrained`` load AutoAWQ checkpoints (``quant_method: "awq"``) with
    awqtensor instead of transformers' GPT-QModel-based quantizer, in this process;
    ``enable=False`` restores transformers' own."""
    from transformers.quantizers.quantizer_awq import AwqQuantizer

    AUTO_QUANTIZER_MAPPING["awq"] = AutoAWQQuantizer if enable else AwqQuantizer
