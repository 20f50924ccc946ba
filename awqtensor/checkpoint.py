"""What every checkpoint directory we read or write has in common: a Hugging Face
``config.json``, weights in one safetensors file or in shards with an index, and the
tokenizer and generation files beside them. The formats (``autoawq``, ``native``)
decide only how a quantized Linear becomes tensors and back.

Nothing here unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from .moe import experts_to_linears
from .tensor import Int4AWQTensor

PER_EXPERT = re.compile(r"\.experts\.\d+\.")
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files a model directory carries besides config and weights, copied as they are.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size) -> int:
    """Bytes in ``size``: an int, or a string such as "5GB", "500MB", "2GiB" (Hugging Face's
    decimal units; KiB/MiB/GiB binary)."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"shard_size must be a positive size such as '5GB' or '500MB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def read_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; expected a model directory with config.json")
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err})") from err


def weight_files(path) -> dict[str, Path]:
    """{tensor name: file} for a directory with model.safetensors or a sharded index."""
    path = Path(path)
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{path / INDEX} is not a safetensors index (no weight_map)") from err
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{file.name}, named in {INDEX}, is missing from {path}")
        return files
    if (path / SINGLE).is_file():
        return {name: path / SINGLE for name in _keys(path / SINGLE)}
    found = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" (found {', '.join(found)} without {INDEX})" if found else ""
    raise FileNotFoundError(f"{path} has neither {SINGLE} nor {INDEX}{hint}")


def _keys(file: Path) -> list[str]:
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated") from err


def sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of ``tensor``'s bytes as safetensors stores them (row-major, little-endian)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def _verify(name: str, tensor: torch.Tensor, expected: str | None, file: Path) -> None:
    if expected is None:
        raise ValueError(f"{file}: {name} has no recorded checksum though the other tensors have; the "
                         f"checkpoint was changed after it was saved: re-save or re-download it")
    if sha256(tensor) != expected:
        raise ValueError(f"{file}: {name} does not match its recorded checksum; the checkpoint is "
                         f"corrupted: re-save or re-download it")


def read_tensors(path, desc: str = "loading", checksums: dict[str, str] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor of the checkpoint, the first file's metadata), with a progress bar.
    With ``checksums`` ({name: sha256 hex}), every tensor must match its own and every
    checksum must have its tensor."""
    files = weight_files(path)
    if checksums is not None:
        absent = sorted(set(checksums) - set(files))
        if absent:
            raise ValueError(f"{path}: {absent[0]} is missing: its checksum is recorded but no weight file holds "
                             f"it; the checkpoint is incomplete: re-save or re-download it")
    tensors, metadata = {}, None
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    with tqdm(total=len(files), desc=desc, unit="tensor", disable=None) as bar:
        for file, names in by_file.items():
            try:
                with safetensors.safe_open(str(file), framework="pt") as f:
                    metadata = metadata if metadata is not None else (f.metadata() or {})
                    present = set(f.keys())
                    for name in names:
                        if name not in present:
                            raise ValueError(f"{name} is listed for {file.name} but missing from it")
                        tensors[name] = f.get_tensor(name)
                        if checksums is not None:
                            _verify(name, tensors[name], checksums.get(name), file)
                        bar.update()
            except (safetensors.SafetensorError, OSError) as err:
                raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated") from err
    return tensors, metadata or {}


def write_tensors(tensors: dict[str, torch.Tensor], path, shard_size="5GB", metadata: dict | None = None,
                  desc: str = "saving") -> list[str]:
    """Write ``tensors`` as model.safetensors, or as shards of at most ``shard_size`` plus an
    index when they don't fit in one; returns the file names. Stale weight files go first."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(shard_size)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    for stale in [*path.glob("model*.safetensors"), path / INDEX]:
        stale.unlink(missing_ok=True)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for name, shard in tqdm(list(zip(names, shards)), desc=desc, unit="file", disable=None):
        safetensors.torch.save_file(shard, str(path / name), metadata={"format": "pt", **(metadata or {})})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def nonfinite_scales(state: dict) -> list[str]:
    """Names of the Int4AWQTensor scales and act_scales in ``state`` holding inf or nan:
    each turns every output the weight touches into inf or nan."""
    bad = []
    for name, value in state.items():
        if isinstance(value, Int4AWQTensor):
            for field in ("scales", "act_scale"):
                t = getattr(value, field)
                if t is not None and not torch.isfinite(t).all():
                    bad.append(f"{name}.{field}")
    return bad


def write_config(config: dict, path) -> None:
    (Path(path) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(model: nn.Module, path) -> list[str]:
    """Copy the tokenizer and generation files from the directory ``model`` was loaded from,
    when that is a local directory; returns what was copied."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    source, path = Path(str(source)), Path(path)
    if not str(source) or not source.is_dir() or source.resolve() == path.resolve():
        return []
    copied = []
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, path / name)
            copied.append(name)
    return copied


@contextmanager
def _parameters_on_meta():
    """Every parameter created inside goes to the meta device (buffers stay real), so a
    model skeleton costs no memory and no random initialisation."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_model(config: dict, dtype: torch.dtype, state: dict[str, torch.Tensor], desc: str = "model"):
    """A transformers causal LM from ``config`` (the quantization_config left out) whose
    parameters are exactly ``state``: every parameter must be given, unless tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = config.get("model_type")
    if not model_type:
        raise ValueError(f"{desc}: config.json has no model_type")
    hf_config = AutoConfig.for_model(**config)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        if any(PER_EXPERT.search(name) for name in state):  # saved from awqtensor.moe's per-expert Linears
            experts_to_linears(model)
    expected = dict(model.named_parameters(remove_duplicate=False))
    unexpected = sorted(set(state) - set(expected) - {n for n, _ in model.named_buffers()})
    if unexpected:
        raise ValueError(f"{desc}: the checkpoint has tensors the {model_type} model does not: "
                         f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for name, value in state.items():
        if name in expected and tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{desc}: {name} has shape {tuple(value.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")
    nonfinite = nonfinite_scales(state)
    if nonfinite:
        more = f" (and {len(nonfinite) - 1} more)" if len(nonfinite) > 1 else ""
        raise ValueError(f"{desc}: {nonfinite[0]} holds inf or nan{more}; the checkpoint is corrupted or was "
                         f"saved from a broken model: re-quantize and re-save it")
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{desc}: the checkpoint lacks {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def drop_tied(model: nn.Module, tensors: dict) -> dict:
    """Leave out a tied lm_head (safetensors refuses shared storage; loading re-ties it)."""
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        name = next((n for n, m in model.named_modules() if m is out), None)
        if name is not None and out.weight is model.get_input_embeddings().weight:
            tensors.pop(f"{name}.weight", None)
    return tensors


def config_dtype(config: dict, default: torch.dtype) -> torch.dtype:
    """The dtype config.json names (``dtype`` or the older ``torch_dtype``)."""
    name = config.get("dtype") or config.get("torch_dtype")
    if not name:
        return default
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config.json names dtype {name!r}, not a torch float dtype")
    return dtype
