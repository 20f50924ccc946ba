"""AutoAWQ's GEMM checkpoint format, read and written bit-exact, so the AWQ models on the
Hugging Face hub load here and what we quantize serves in vLLM.

The format, per quantized Linear with in_features K, out_features N and group size G:

    qweight  int32 [K, N/8]    eight 4-bit codes per word, along the output dimension
    qzeros   int32 [K/G, N/8]  the zero points (0..15, stored as they are), packed alike
    scales   fp16  [K/G, N]
    bias     [N], when the Linear has one

Nibble i (bits 4i..4i+3) of word c holds output column 8c + ORDER[i]; the weight is
(q - zero) * scale. ``config.json`` carries quantization_config {"quant_method": "awq",
"bits": 4, "group_size": G, "zero_point": true, "version": "gemm",
"modules_to_not_convert": [...]}.

Int4AWQTensor keeps codes along K ([N, K/2] nibbles) with scales and zeros [N, groups],
so converting is a transpose and a repack, done once at load or save time.

Mixtures of experts are stored one Linear per expert. Mixtral-style models (the hub's
checkpoints, AutoAWQ's and vLLM's Mixtral loaders) name them
``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate/up/down) where transformers 5 says
``mlp.experts.{e}.gate_proj/up_proj/down_proj``: those names are written and read here;
Qwen- and DeepSeek-style models keep transformers' names, which are theirs too.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, packing, quant
from .head import Int8HeadTensor
from .tensor import Int4AWQTensor

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + ORDER[i]
FIELDS = ("qweight", "qzeros", "scales")
GROUP_SIZES = (32, 64, 128)  # what vLLM's AWQ kernels (and AutoAWQ's) are built for


def pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """[R, C] codes 0..15 -> int32 [R, C/8] in AutoAWQ's interleaved nibble order."""
    r, c = codes.shape
    if c % 8:
        raise ValueError(f"AutoAWQ packs 8 columns per int32; {c} columns is not a multiple of 8")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"4-bit codes must lie in 0..15, got {int(codes.min())}..{int(codes.max())}: they would "
                         f"spill into their neighbours' bits")
    c8 = codes.to(torch.int64).reshape(r, c // 8, 8)[..., list(ORDER)]
    words = (c8 << (4 * torch.arange(8))).sum(-1)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # two's complement into int32


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> uint8 codes [R, C]; the inverse of ``pack_columns``."""
    r, c8 = words.shape
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    out = torch.empty_like(nibbles)
    out[..., list(ORDER)] = nibbles
    return out.reshape(r, c8 * 8).to(torch.uint8)


def to_gemm(weight: Int4AWQTensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """{qweight, qzeros, scales} of ``weight`` in AutoAWQ's GEMM layout; raises ValueError
    saying what to change when the format cannot hold it. Symmetric weights are written
    with zero point 8, which reproduces them exactly."""
    n, k = weight.shape
    g = weight.group_size
    if weight.act_scale is not None:
        raise ValueError(f"{name} keeps an activation scale (AWQ found nothing to fold it into); the AutoAWQ "
                         f"format has no place for it: quantize with awq_config(..., act_scale=False) (that "
                         f"group keeps scale 1), or save with awqtensor.save_quantized")
    if g not in GROUP_SIZES:
        raise ValueError(f"{name} has group size {g}; AutoAWQ checkpoints (and vLLM) take {GROUP_SIZES}: "
                         f"re-quantize with one of those")
    if k % g:
        raise ValueError(f"{name} has in_features {k}, not a multiple of its group size {g} (awqtensor pads; "
                         f"AutoAWQ cannot): re-quantize with a group size that divides {k}, or save with "
                         f"awqtensor.save_quantized")
    if n % 8:
        raise ValueError(f"{name} has out_features {n}, not a multiple of 8, which AutoAWQ packs per int32")
    codes = packing.unpack_nibbles(weight.plain_qweight(), k)  # [N, K]
    zeros = weight.zeros if weight.zeros is not None else torch.full_like(codes[:, :k // g], quant.SYMMETRIC_ZERO)
    scales = weight.scales.T.to(torch.float16).contiguous()
    if not torch.isfinite(scales).all():
        raise ValueError(f"{name} has a scale beyond fp16's range (largest {weight.scales.abs().max().item():.4g}; "
                         f"fp16 holds up to 65504), which AutoAWQ checkpoints store in fp16; save with "
                         f"awqtensor.save_quantized instead")
    return {"qweight": pack_columns(codes.T.contiguous()), "qzeros": pack_columns(zeros.T.contiguous()),
            "scales": scales}


def from_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
              dtype: torch.dtype, name: str = "weight") -> Int4AWQTensor:
    """The Int4AWQTensor for one Linear's GEMM tensors, checked against each other."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{name}: qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"{name}: in_features {k} is not a multiple of the config's group_size {g}")
    for field, t, shape in (("qzeros", qzeros, (k // g, n // 8)), ("scales", scales, (k // g, n))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.{field} has shape {tuple(t.shape)}, expected {shape} for qweight "
                             f"{tuple(qweight.shape)} and group_size {g}")
    codes = unpack_columns(qweight).T.contiguous()  # [N, K]
    plain = Int4AWQTensor(packing.pack_nibbles(codes), scales.T.to(dtype).contiguous(), g,
                          torch.Size((n, k)), packing.PLAIN, unpack_columns(qzeros).T.contiguous())
    return plain._repacked_for("cpu", dtype)


def _quantization_config(config: dict, path) -> dict:
    qc = config.get("quantization_config")
    if not qc or str(qc.get("quant_method", "")).lower() != "awq":
        raise ValueError(f"{path}: config.json has no quantization_config with quant_method 'awq'; "
                         f"not an AutoAWQ checkpoint (awqtensor.load_quantized reads our own format)")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{path}: AutoAWQ version {version!r} is not supported; awqtensor reads the 'gemm' "
                         f"variant (most hub models); convert it with AutoAWQ to GEMM first")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{path}: {bits}-bit AWQ is not supported; awqtensor holds 4-bit weights")
    if qc.get("zero_point", True) is not True:
        raise ValueError(f"{path}: zero_point=false AutoAWQ checkpoints are not supported")
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"{path}: quantization_config group_size must be a positive int or -1, got {group_size!r}")
    return qc


# (transformers 5's name, the Mixtral checkpoint's), applied in this order when saving.
_MIXTRAL_NAMES = ((r"\.mlp\.", ".block_sparse_moe."), (r"(\.experts\.\d+\.)gate_proj\.", r"\1w1."),
                  (r"(\.experts\.\d+\.)up_proj\.", r"\1w3."), (r"(\.experts\.\d+\.)down_proj\.", r"\1w2."))


def _mixtral_style(config: dict) -> bool:
    """Whether the model's checkpoints name experts Mixtral's way (transformers says which)."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as styles
    except ImportError:  # pragma: no cover - older transformers: Mixtral itself
        styles = {}
    model_type = config.get("model_type")
    return model_type == "mixtral" or styles.get(model_type) == "mixtral"


def _to_mixtral_names(name: str) -> str:
    for ours, theirs in _MIXTRAL_NAMES:
        name = re.sub(ours, theirs, name)
    return name


def _from_mixtral_names(name: str) -> str:
    name = name.replace(".block_sparse_moe.", ".mlp.")
    for part, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        name = re.sub(rf"(\.experts\.\d+\.){theirs}\.", rf"\1{part}.", name)
    return name


def load_autoawq(path, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """A transformers model from an AutoAWQ GEMM checkpoint directory, each quantized Linear
    holding an Int4AWQTensor (repacked once for ``device``). ``dtype`` defaults to the
    config's (fp16 for most hub models); modules_to_not_convert stay float."""
    path = Path(path)
    config = checkpoint.read_config(path)
    qc = _quantization_config(config, path)
    dtype = dtype or checkpoint.config_dtype(config, torch.float16)
    tensors, _ = checkpoint.read_tensors(path, desc="loading AutoAWQ")
    state = {}
    prefixes = sorted({n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")})
    if not prefixes:
        raise ValueError(f"{path}: no '*.qweight' tensors; the checkpoint holds no quantized Linear")
    for prefix in prefixes:
        fields = {f: tensors.pop(f"{prefix}.{f}", None) for f in FIELDS}
        absent = [f for f, t in fields.items() if t is None]
        if absent:
            raise ValueError(f"{path}: {prefix}.{absent[0]} is missing (every quantized Linear needs {FIELDS})")
        weight = from_gemm(fields["qweight"], fields["qzeros"], fields["scales"], qc["group_size"], dtype, prefix)
        state[f"{prefix}.weight"] = weight
    for name, t in tensors.items():
        state[name] = t.to(dtype) if t.is_floating_point() else t
    if _mixtral_style(config):
        state = {_from_mixtral_names(name): t for name, t in state.items()}
    model = checkpoint.build_model(config, dtype, state, desc=str(path))
    return model.to(device) if torch.device(device).type != "cpu" else model


def save_autoawq(model: nn.Module, path, shard_size="5GB", dtype: torch.dtype = torch.float16,
                 overwrite: bool = False) -> Path:
    """Write ``model`` (a quantized transformers model) as an AutoAWQ GEMM checkpoint that
    vLLM's and transformers' AWQ loaders read. Float tensors are cast to ``dtype`` (AWQ
    kernels run in fp16), and so are the scales. Raises ValueError naming the Linear and
    what to change when the format cannot hold a weight (a value beyond ``dtype``'s range
    included). An 8-bit head (``quantize_head_``) is written dequantized: the format has no
    8-bit tensors. Written beside ``path`` and moved into place when complete, with
    ``save_quantized``'s rules for an existing ``path`` and ``overwrite``."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Int4AWQTensor)}
    if not quantized:
        raise ValueError("the model has no Int4AWQTensor weights; quantize it with awqtensor.quantize_ first")
    group_sizes = {m.weight.group_size for m in quantized.values()}
    if len(group_sizes) > 1:
        raise ValueError(f"the model mixes group sizes {sorted(group_sizes)}; an AutoAWQ config holds one")
    w4a8 = [n for n, m in quantized.items() if m.weight.activations is not None]
    if w4a8:
        warnings.warn(f"{len(w4a8)} Linears are W4A8 (activations='int8', {w4a8[0]}, ...); AutoAWQ's format is "
                      f"weight-only, so their int4 weights are written and loaders run them weight-only "
                      f"(save_quantized keeps the mode)", stacklevel=2)
    tensors = {}
    for name, value in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized and name.endswith(".weight"):
            tensors.update({f"{owner}.{f}": t for f, t in to_gemm(value, name).items()})
        elif isinstance(value, Int8HeadTensor):  # the format has no 8-bit head: written in float
            tensors[name] = value.dequantize().to(dtype)
        else:
            tensors[name] = value.to(dtype) if value.is_floating_point() else value
        cast = tensors.get(name)
        if cast is not None and cast.is_floating_point() and not torch.isfinite(cast).all():
            raise ValueError(f"{name} holds values beyond {dtype}'s range (or inf/nan) once cast to it; save in a "
                             f"wider dtype (save_autoawq(..., dtype=torch.bfloat16)) or with awqtensor.save_quantized")
    tensors = checkpoint.drop_tied(model, tensors)
    config = model.config.to_dict()
    path = checkpoint.check_destination(path, config, checkpoint.model_source(model), overwrite)
    rename = _to_mixtral_names if _mixtral_style(config) else (lambda name: name)
    tensors = {rename(name): t for name, t in tensors.items()}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config["quantization_config"] = {
        "quant_method": "awq", "bits": 4, "group_size": group_sizes.pop(), "zero_point": True, "version": "gemm",
        "modules_to_not_convert": sorted(rename(n) for n in linears if n not in quantized) or None}
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    with checkpoint.staged_directory(path) as stage:
        checkpoint.write_tensors(tensors, stage, shard_size, desc="saving AutoAWQ")
        checkpoint.copy_side_files(model, stage)
        checkpoint.write_config(config, stage)
    return path


