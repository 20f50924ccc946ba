"""What every checkpoint directory we read or write has in common: a Hugging Face
``config.json``, weights in one safetensors file or in shards with an index, and the
tokenizer and generation files beside them. The formats (``autoawq``, ``native``)
decide only how a quantized Linear becomes tensors and back.

Nothing here unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
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
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'} holds a JSON {type(config).__name__}, not an object")
    if not isinstance(config.get("quantization_config") or {}, dict):
        raise ValueError(f"{path / 'config.json'}: quantization_config is not a JSON object")
    return config


def weight_files(path) -> dict[str, Path]:
    """{tensor name: file} for a directory with model.safetensors or a sharded index."""
    path = Path(path)
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path / INDEX} is not a safetensors index (no weight_map)") from err
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path / INDEX}: weight_map is not a mapping of tensor names to file names")
        files = {name: path / shard_name(file, path) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{file.name}, named in {INDEX}, is missing from {path}")
        return files
    if (path / SINGLE).is_file():
        return {name: path / SINGLE for name in _keys(path / SINGLE)}
    found = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" (found {', '.join(found)} without {INDEX})" if found else ""
    raise FileNotFoundError(f"{path} has neither {SINGLE} nor {INDEX}{hint}")


def shard_name(name, path) -> str:
    """``name`` if it is a plain file name (no directory part, not absolute, not "." or
    ".."), so that it resolves inside the checkpoint directory ``path``; else ValueError.
    Every reader goes through this before it opens anything an index names."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name) or Path(name).name != name):
        raise ValueError(f"{Path(path) / INDEX} names the weight file {name!r}, which is not a plain file name "
                         f"inside {path}; the index is corrupted or crafted: nothing was read (re-save or "
                         f"re-download the checkpoint)")
    return name


def _keys(file: Path) -> list[str]:
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated") from err


DIGEST_SCHEME = "sha256(dtype,shape,bytes)"


def digest(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of ``tensor``'s dtype, shape and bytes as safetensors stores them
    (row-major, little-endian): a changed dtype or shape in a header changes it too."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def config_digest(fields: dict) -> str:
    """Hex SHA-256 of the quantization fields of a config (canonical JSON)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _verify(name: str, tensor: torch.Tensor, expected: str | None, file: Path) -> None:
    if expected is None:
        raise ValueError(f"{file}: {name} has no recorded digest though the other tensors have; the "
                         f"checkpoint was changed after it was saved: re-save or re-download it")
    if digest(tensor) != expected:
        raise ValueError(f"{file}: {name} does not match its recorded digest (dtype, shape and bytes); the "
                         f"checkpoint is corrupted: re-save or re-download it")


def read_tensors(path, desc: str = "loading", checksums: dict[str, str] | None = None, keep: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(every tensor of the checkpoint, the first file's metadata), with a progress bar.
    With ``checksums`` ({name: ``digest`` hex}), every tensor must match its own and every
    digest must have its tensor. ``keep=False`` only checks (the dict comes back empty)."""
    files = weight_files(path)
    if checksums is not None:
        absent = sorted(set(checksums) - set(files))
        if absent:
            raise ValueError(f"{path}: {absent[0]} is missing: its digest is recorded but no weight file holds "
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
                        tensor = f.get_tensor(name)
                        if checksums is not None:
                            _verify(name, tensor, checksums.get(name), file)
                        if keep:
                            tensors[name] = tensor
                        bar.update()
            except (safetensors.SafetensorError, OSError) as err:
                raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated") from err
    return tensors, metadata or {}


def write_tensors(tensors: dict[str, torch.Tensor], path, shard_size="5GB", metadata: dict | None = None,
                  desc: str = "saving") -> list[str]:
    """Write ``tensors`` into the directory ``path`` (a fresh staging directory: see
    ``staged_directory``) as model.safetensors, or as shards of at most ``shard_size`` plus
    an index when they don't fit in one; returns the file names. Deletes nothing."""
    path = Path(path)
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
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for name, shard in tqdm(list(zip(names, shards)), desc=desc, unit="file", disable=None):
        safetensors.torch.save_file(shard, str(path / name), metadata={"format": "pt", **(metadata or {})})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX)
    return names


def _model_fields(config: dict) -> dict:
    """What identifies a model in its config.json: everything but how it is stored."""
    volatile = {"quantization_config", "_name_or_path", "name_or_path", "transformers_version", "dtype",
                "torch_dtype", "architectures", "use_cache"}
    return {k: v for k, v in config.items() if k not in volatile}


def check_destination(path, config: dict | None = None, source=None, overwrite: bool = False) -> Path:
    """Refuse (ValueError) to save into ``path`` when that would lose something: a path that
    is a file, the directory the model was loaded from (``source``), or a directory holding
    a different model (its config.json differs from ``config`` in more than how it is
    stored), unless ``overwrite``. Returns ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; choose a directory to save the checkpoint in")
    if overwrite or not path.is_dir():
        return path
    if source and Path(str(source)).is_dir() and Path(str(source)).resolve() == path.resolve():
        raise ValueError(f"{path} is the directory the model was loaded from; saving there would replace its "
                         f"weights: choose another output directory, or pass overwrite=True (--overwrite)")
    if config is not None and (path / "config.json").is_file():
        try:
            there = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            there = None
        ours = json.loads(json.dumps(config))  # as it would read back (int keys become strings)
        if not isinstance(there, dict) or _model_fields(there) != _model_fields(ours):
            raise ValueError(f"{path} already holds a different model (its config.json differs); choose another "
                             f"output directory, or pass overwrite=True (--overwrite) to replace it")
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _old_weight_files(path: Path) -> set[str]:
    """The weight files the checkpoint now in ``path`` consists of (its index's shards, or
    model.safetensors): the only files a save may remove, once the new ones are in place."""
    old = {SINGLE} if (path / SINGLE).is_file() else set()
    try:
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        old |= {INDEX, *(shard_name(n, path) for n in set(weight_map.values()))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return old


@contextmanager
def staged_directory(path):
    """Yield a fresh staging directory beside ``path``; when the block ends without an
    error, everything written there is fsynced and moved into ``path``: as a whole by one
    rename when ``path`` does not exist, else file by file with config.json last, after
    which the weight files of the checkpoint it replaced that the new one does not reuse
    are removed (no other file is touched). On an error the staging directory is removed
    and ``path`` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield stage
        written = sorted(p.name for p in stage.iterdir())
        for name in written:
            _fsync(stage / name)
        _fsync(stage)
        if not path.exists():
            os.rename(stage, path)
        else:
            stale = _old_weight_files(path) - set(written)
            last = ["config.json"] if "config.json" in written else []
            for name in [n for n in written if n != "config.json"] + last:
                os.replace(stage / name, path / name)
            for name in stale:
                (path / name).unlink(missing_ok=True)
        _fsync(path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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
    """config.json into ``path`` (a staging directory)."""
    (Path(path) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_source(model: nn.Module) -> str:
    """The local directory (or hub name) ``model`` was loaded from, "" when unknown."""
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", ""))


def copy_side_files(model: nn.Module, path) -> list[str]:
    """Copy the tokenizer and generation files from the directory ``model`` was loaded from,
    when that is a local directory, into ``path`` (a staging directory); returns what was copied."""
    source, path = Path(model_source(model)), Path(path)
    if not str(source) or not source.is_dir() or source.resolve() == path.resolve():
        return []
    copied = []
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, path / name)
            copied.append(name)
    return copied


_skeleton = threading.local()  # .active: this thread is building a skeleton
_skeleton_lock = threading.Lock()
_skeleton_users = 0
_register_parameter = None  # nn.Module's own while the hook is installed


def _register_on_meta(module, name, param):
    _register_parameter(module, name, param)
    if getattr(_skeleton, "active", False) and param is not None and param.device.type != "meta":
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def _parameters_on_meta():
    """Every parameter this thread creates inside goes to the meta device (buffers stay
    real), so a model skeleton costs no memory and no random initialisation. Other threads
    are unaffected: the hook is installed while any thread builds a skeleton and acts only
    for the threads that asked."""
    global _skeleton_users, _register_parameter
    with _skeleton_lock:
        if _skeleton_users == 0:
            _register_parameter = nn.Module.register_parameter
            nn.Module.register_parameter = _register_on_meta
        _skeleton_users += 1
    was_active, _skeleton.active = getattr(_skeleton, "active", False), True
    try:
        yield
    finally:
        _skeleton.active = was_active
        with _skeleton_lock:
            _skeleton_users -= 1
            if _skeleton_users == 0:
                nn.Module.register_parameter = _register_parameter


LAYER = re.compile(r"\.layers\.(\d+)\.")


def _check_sizes(config: dict, state: dict[str, torch.Tensor], desc: str) -> None:
    """The config's depth and embedding sizes must be those of the stored tensors, checked
    before a skeleton is built (a corrupted num_hidden_layers of a million would take
    minutes and gigabytes to find out otherwise)."""
    layers = {int(m.group(1)) for name in state if (m := LAYER.search(name))}
    depth = config.get("num_hidden_layers")
    if layers and depth != len(layers):
        raise ValueError(f"{desc}: config.json says num_hidden_layers {depth!r}, the checkpoint holds {len(layers)} "
                         f"layers; restore config.json")
    for name, t in state.items():
        if name.endswith("embed_tokens.weight") and t.dim() == 2:
            for key, size in (("vocab_size", t.shape[0]), ("hidden_size", t.shape[1])):
                if key in config and config[key] != size:
                    raise ValueError(f"{desc}: config.json says {key} {config[key]!r}, but {name} has shape "
                                     f"{tuple(t.shape)}; restore config.json")


def build_model(config: dict, dtype: torch.dtype, state: dict[str, torch.Tensor], desc: str = "model"):
    """A transformers causal LM from ``config`` (the quantization_config left out) whose
    parameters are exactly ``state``: every parameter must be given, unless tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = config.get("model_type")
    if not model_type:
        raise ValueError(f"{desc}: config.json has no model_type")
    _check_sizes(config, state, desc)
    try:
        hf_config = AutoConfig.for_model(**config)
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as err:  # transformers' and huggingface_hub's validation errors have several classes
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{desc}: config.json does not describe a {model_type!r} model transformers can build "
                         f"({first}); restore config.json") from err
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
