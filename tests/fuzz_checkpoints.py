"""Random corruptions of a saved checkpoint, shared by tests/test_fuzz.py (hypothesis, a
bounded number of examples in CI) and benchmarks/fuzz.py (a long run that counts outcomes).

Each corruption takes a ``random.Random`` and a checkpoint directory and edits it in place:
a safetensors header (dtype, shape, offsets, metadata), the data (truncation, flipped
bytes), the shard index, or config.json. The contract checked by ``outcome``: loading ends
in a clear error (ValueError or OSError, with a message) or gives the identical model,
never a crash, another exception, or silently different outputs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
DTYPES = ["F32", "F16", "BF16", "U8", "I8", "I16", "I32", "I64", "F64", "BOOL", "F8_E4M3", "XYZ", 7]
JUNK = [None, True, -1, 0, 3, 2**40, 1.5, "", "x", "../x", [], [1], [96, -3], {}, {"a": 1}, float("nan")]


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _read_header(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + length]), data[8 + length:]


def _write_header(file: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def _junk(rng: random.Random):
    return rng.choice(JUNK + [rng.randrange(-5, 10**6)])


def header_field(rng: random.Random, path: Path) -> str:
    file = rng.choice(_shards(path))
    header, body = _read_header(file)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    field = rng.choice(["dtype", "shape", "data_offsets", "drop", "rename"])
    if field == "dtype":
        header[name]["dtype"] = rng.choice(DTYPES)
    elif field == "shape":
        header[name]["shape"] = rng.choice([[rng.randrange(0, 400)], [rng.randrange(0, 400), rng.randrange(0, 400)],
                                            [], _junk(rng)])
    elif field == "data_offsets":
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[begin, end + rng.randrange(1, 64)], [end, begin],
                                                   [begin + 1, end], [0, len(body) + 8], _junk(rng)])
    elif field == "drop":
        del header[name]
    else:
        header[name + rng.choice([".x", "s", ""])] = header.pop(name)
    _write_header(file, header, body)
    return f"{file.name}: {field} of {name}"


def header_metadata(rng: random.Random, path: Path) -> str:
    file = rng.choice(_shards(path))
    header, body = _read_header(file)
    meta = header.setdefault("__metadata__", {})
    key = rng.choice(["awqtensor", "format", "version"])
    if key == "awqtensor" and meta.get(key) and rng.random() < 0.7:
        described = json.loads(meta[key])
        name = rng.choice(sorted(described))
        field = rng.choice(["group_size", "shape", "bits", "zero_point", "activations"])
        described[name][field] = _junk(rng)
        meta[key] = json.dumps(described)
    else:
        meta[key] = rng.choice(["", "{", "[]", "awqtensor", "99", json.dumps({"a": 1})])
    _write_header(file, header, body)
    return f"{file.name}: metadata {key}"


def data(rng: random.Random, path: Path) -> str:
    file = rng.choice(_shards(path))
    raw = bytearray(file.read_bytes())
    if rng.random() < 0.5:
        cut = rng.randrange(0, len(raw))
        file.write_bytes(bytes(raw[:cut]))
        return f"{file.name}: truncated to {cut} of {len(raw)} bytes"
    for _ in range(rng.randrange(1, 4)):
        raw[rng.randrange(0, len(raw))] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(raw))
    return f"{file.name}: flipped bits"


def index(rng: random.Random, path: Path) -> str:
    file = path / INDEX
    content = json.loads(file.read_text())
    weight_map = content["weight_map"]
    name = rng.choice(sorted(weight_map))
    how = rng.choice(["drop", "retarget", "add", "junk map", "missing file", "text"])
    if how == "drop":
        del weight_map[name]
    elif how == "retarget":
        weight_map[name] = rng.choice(["../" + weight_map[name], "/etc/passwd", "sub/x.safetensors", "",
                                       rng.choice(sorted(set(weight_map.values()))), _junk(rng)])
    elif how == "add":
        weight_map[name + ".extra"] = weight_map[name]
    elif how == "junk map":
        content["weight_map"] = _junk(rng)
    elif how == "missing file":
        rng.choice(_shards(path)).unlink()
    if how == "text":
        file.write_text(rng.choice(["", "{", "[]", "null"]))
    else:
        file.write_text(json.dumps(content))
    return f"index: {how} {name}"


def config(rng: random.Random, path: Path) -> str:
    file = path / "config.json"
    content = json.loads(file.read_text())
    qc = content["quantization_config"]
    target = rng.choice(["quantization", "weight", "model", "digest", "text"])
    if target == "quantization":
        key = rng.choice(["quant_method", "format_version", "weights", "modules_not_converted", "digests",
                          "group_size", "bits", "zero_point"])
        qc[key] = _junk(rng)
    elif target == "weight":
        name = rng.choice(sorted(qc["weights"]))
        key = rng.choice(["group_size", "shape", "bits", "zero_point", "activations"])
        qc["weights"][name][key] = _junk(rng)
    elif target == "model":
        key = rng.choice(["hidden_size", "num_hidden_layers", "vocab_size", "model_type", "intermediate_size",
                          "num_attention_heads", "num_key_value_heads", "dtype", "tie_word_embeddings"])
        content[key] = _junk(rng)
    elif target == "digest":
        tensors = qc["digests"]["tensors"]
        name = rng.choice(sorted(tensors))
        tensors[name] = rng.choice(["", "0" * 64, tensors[name][::-1], _junk(rng)])
    if target == "text":
        file.write_text(rng.choice(["", "{", "[]", "null", '{"model_type": "llama"}']))
    else:
        file.write_text(json.dumps(content))
    return f"config: {target}"


CORRUPTIONS = {f.__name__: f for f in (header_field, header_metadata, data, index, config)}


def outcome(load, path: Path, tokens: torch.Tensor, want: torch.Tensor) -> str:
    """"identical" or "refused: <error class>"; raises AssertionError for anything else
    (an unexpected exception, an empty message, different outputs)."""
    try:
        model = load(path)
    except (ValueError, OSError) as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return f"refused: {type(err).__name__}"
    with torch.no_grad():
        got = model(tokens).logits
    assert torch.equal(got, want), "loaded a model whose outputs differ, without an error"
    return "identical"
