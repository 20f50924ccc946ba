"""Checkpoints that cannot be turned against their reader or lost by their writer: weight
files confined to the checkpoint directory, digests over dtype, shape and bytes of every
tensor and over the quantization fields, saves that write beside the destination and move
into place, and a model skeleton that never leaks onto other threads."""

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import awqtensor
from awqtensor import checkpoint, load_autoawq, load_quantized, quantize_, rtn_config, save_autoawq, save_quantized
from conftest import tiny_llama

INDEX = "model.safetensors.index.json"


def quantized(seed=0, **overrides):
    model = tiny_llama(seed, **overrides)
    quantize_(model, rtn_config(group_size=32))
    return model


def tokens():
    return torch.randint(0, 320, (2, 12))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def entries(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def rewrite_header(file: Path, edit) -> None:
    """Apply ``edit`` to the JSON header of a safetensors file, keeping its data bytes."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])


def sharded(path: Path, model, **kwargs) -> dict:
    save_quantized(model, path, shard_size="20KB", **kwargs)
    return json.loads((path / INDEX).read_text())


# -- confined reads --------------------------------------------------------------------

ESCAPES = ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors", "..", ""]


@pytest.mark.parametrize("escape", ESCAPES)
def test_an_index_naming_a_file_outside_the_checkpoint_is_refused_by_every_reader(tmp_path, escape, monkeypatch):
    ckpt = tmp_path / "ckpt"
    index = sharded(ckpt, quantized())
    victim = sorted(set(index["weight_map"].values()))[0]
    # a real, readable safetensors file where the escaping name points
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((ckpt / victim).read_bytes())
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "model.safetensors").write_bytes((ckpt / victim).read_bytes())
    index["weight_map"] = {n: (escape if f == victim else f) for n, f in index["weight_map"].items()}
    (ckpt / INDEX).write_text(json.dumps(index))
    opened = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    match = "not a plain file name inside"
    with pytest.raises(ValueError, match=match):
        load_quantized(ckpt)
    with pytest.raises(ValueError, match=match):
        checkpoint.read_tensors(ckpt)
    from transformers import AutoModelForCausalLM

    with pytest.raises((ValueError, OSError)):
        AutoModelForCausalLM.from_pretrained(ckpt)
    assert not [f for f in opened if "outside" in f or "/sub/" in f]
    from awqtensor.cli import main

    assert main(["info", str(ckpt)]) == 2


def test_autoawq_reader_is_confined_too(tmp_path):
    ckpt = tmp_path / "awq"
    save_autoawq(quantized(), ckpt, shard_size="20KB")
    index = json.loads((ckpt / INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../" + index["weight_map"][first]
    (ckpt / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a plain file name inside"):
        load_autoawq(ckpt)


def test_info_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_quantized(quantized(), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["weights"] = ["not", "a", "mapping"]
    (ckpt / "config.json").write_text(json.dumps(config))
    from awqtensor.cli import main

    assert main(["info", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "not a mapping" in err, err


# -- integrity -------------------------------------------------------------------------

def test_a_changed_dtype_in_a_header_is_caught_with_the_same_bytes(tmp_path):
    model = quantized().to(torch.float16)
    save_quantized(model, tmp_path)
    file = tmp_path / "model.safetensors"
    original = file.read_bytes()
    want = logits(load_quantized(tmp_path, dtype=torch.float16), t := tokens())
    for name in ["model.layers.0.mlp.up_proj.weight.scales", "model.norm.weight", "model.embed_tokens.weight"]:
        rewrite_header(file, lambda h: h[name].update(dtype="BF16"))  # F16 -> BF16: same size, other values
        with pytest.raises(ValueError, match=rf"{name} does not match its recorded digest"):
            load_quantized(tmp_path)
        file.write_bytes(original)
    assert torch.equal(logits(load_quantized(tmp_path, dtype=torch.float16), t), want)


def test_a_changed_shape_in_a_header_is_caught(tmp_path):
    save_quantized(quantized(), tmp_path)
    name = "model.layers.1.self_attn.q_proj.weight.scales"  # [96, 3] -> [288, 1]: the same bytes
    rewrite_header(tmp_path / "model.safetensors", lambda h: h[name].update(shape=[288, 1]))
    with pytest.raises(ValueError, match=rf"{name} does not match its recorded digest"):
        load_quantized(tmp_path)


def test_an_edited_quantization_field_is_caught_and_verify_false_skips_the_digests(tmp_path):
    model = quantized()
    save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["modules_not_converted"].append("model.layers.0.mlp.up_proj")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization_config does not match its recorded digest"):
        load_quantized(tmp_path)
    assert torch.equal(logits(load_quantized(tmp_path, verify=False), t := tokens()), logits(model, t))


def test_from_pretrained_checks_float_tensors_and_refuses_unverifiable_checkpoints(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = quantized()
    save_quantized(model, tmp_path)
    file = tmp_path / "model.safetensors"
    original = file.read_bytes()
    tensors = safetensors.torch.load_file(file)
    with safetensors.safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors["model.layers.1.input_layernorm.weight"][5] += 0.5  # a float tensor
    safetensors.torch.save_file(tensors, str(file), metadata=metadata)
    with pytest.raises(ValueError, match="input_layernorm.weight does not match its recorded digest"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    file.write_bytes(original)

    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]["digests"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records no digests .* AWQTENSOR_VERIFY=0"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    monkeypatch.setenv("AWQTENSOR_VERIFY", "0")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded, t := tokens()), logits(model, t))


# -- atomic, non-destructive saves --------------------------------------------------------

class Boom(RuntimeError):
    pass


def failing_after(monkeypatch, calls: int):
    """safetensors' writer, failing on call number ``calls`` after writing half a file."""
    real = safetensors.torch.save_file
    count = [0]

    def save_file(tensors, filename, metadata=None):
        count[0] += 1
        if count[0] == calls:
            Path(filename).write_bytes(b"\0" * 1000)  # a partial file, then the failure
            raise Boom("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("save", [save_quantized, save_autoawq])
def test_a_failure_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, save):
    load = load_quantized if save is save_quantized else load_autoawq
    target = tmp_path / "out"
    first = quantized(seed=0)
    save(first, target, shard_size="20KB")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    t = tokens()
    want = logits(load(target), t)

    second = quantized(seed=1)
    failing_after(monkeypatch, 3)
    with pytest.raises(Boom):
        save(second, target, shard_size="20KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert entries(tmp_path) == {"out"}  # no staging directory left behind
    assert torch.equal(logits(load(target), t), want)

    failing_after(monkeypatch, 1)  # into a new directory: nothing that looks like a checkpoint
    with pytest.raises(Boom):
        save(second, tmp_path / "new", shard_size="20KB")
    assert entries(tmp_path) == {"out"}


def test_saves_remove_only_the_weight_files_of_the_checkpoint_they_replace(tmp_path):
    model = quantized()
    old = sharded(tmp_path, model)
    old_shards = set(old["weight_map"].values())
    assert len(old_shards) > 2
    (tmp_path / "model-backup.safetensors").write_bytes(b"the user's")
    (tmp_path / "README.md").write_text("notes")
    save_quantized(model, tmp_path)  # one file now
    assert not (tmp_path / INDEX).exists() and not old_shards & entries(tmp_path)
    assert (tmp_path / "model-backup.safetensors").read_bytes() == b"the user's"
    assert (tmp_path / "README.md").read_text() == "notes"
    assert torch.equal(logits(load_quantized(tmp_path), t := tokens()), logits(model, t))


def test_refuses_the_source_directory_and_a_different_model_unless_told_to_overwrite(tmp_path):
    from transformers import AutoModelForCausalLM

    source = tmp_path / "float"
    tiny_llama(0).save_pretrained(source)
    weights = (source / "model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    quantize_(model, rtn_config(group_size=32))
    for save in (save_quantized, save_autoawq):
        with pytest.raises(ValueError, match="the directory the model was loaded from"):
            save(model, source)
    assert (source / "model.safetensors").read_bytes() == weights

    other = tmp_path / "other"
    save_quantized(quantized(hidden_size=128), other)
    with pytest.raises(ValueError, match="already holds a different model"):
        save_quantized(model, other)
    save_quantized(model, other, overwrite=True)
    save_quantized(model, other)  # the same model again is fine
    save_quantized(model, source, overwrite=True)  # replaces the source's weights, reading them first
    assert torch.equal(logits(load_quantized(source), t := tokens()), logits(model, t))

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_quantized(model, tmp_path / "file")


def test_cli_refuses_to_write_over_the_model_it_quantizes(tmp_path):
    source = tmp_path / "float"
    tiny_llama(0).save_pretrained(source)
    before = entries(source)
    from awqtensor.cli import main

    assert main(["quantize", str(source), "--out", str(source), "--method", "rtn", "--group-size", "32"]) == 2
    assert entries(source) == before


def test_gguf_writes_through_a_unique_temporary_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from test_gguf import tiny

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["a small text to train on, twice " * 4], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    model = tiny("llama")
    quantize_(model, rtn_config(group_size=32))
    target = tmp_path / "m.gguf"
    awqtensor.save_gguf(model, target, tokenizer)
    before = target.read_bytes()

    def broken(self):
        raise Boom("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(Boom):
        awqtensor.save_gguf(model, target, tokenizer)
    assert target.read_bytes() == before and entries(tmp_path) == {"m.gguf"}
    monkeypatch.undo()

    other = tmp_path / "notes.txt"
    other.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        awqtensor.save_gguf(model, other, tokenizer)
    assert other.read_text() == "not a model"

    big = model.model.layers[0].mlp.up_proj
    w = big.weight
    # scales up to 10000 fit in fp16, -zero * scale (zero points near 8) does not
    big.weight = nn.Parameter(w._replace(scales=w.scales / w.scales.max() * 1e4), requires_grad=False)
    with pytest.raises(ValueError, match="does not fit in fp16"):
        awqtensor.save_gguf(model, tmp_path / "big.gguf", tokenizer)
    assert not (tmp_path / "big.gguf").exists()


def test_save_autoawq_refuses_a_scale_beyond_fp16(tmp_path):
    model = quantized()
    linear = model.model.layers[1].mlp.down_proj
    w = linear.weight
    linear.weight = nn.Parameter(w._replace(scales=w.scales / w.scales.max() * 1e5), requires_grad=False)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight has a scale beyond fp16's range"):
        save_autoawq(model, tmp_path / "awq")
    assert not (tmp_path / "awq").exists()


# -- the skeleton stays on its own thread ---------------------------------------------------

def test_two_threads_load_at_once_and_a_third_keeps_real_parameters(tmp_path):
    model = quantized()
    save_quantized(model, tmp_path)
    want = logits(model, t := tokens())
    original = nn.Module.register_parameter
    results, errors, stop = [], [], threading.Event()

    def load():
        try:
            for _ in range(3):
                results.append(logits(load_quantized(tmp_path), t))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    def build():
        while not stop.is_set():
            if nn.Linear(8, 8).weight.device.type != "cpu":
                errors.append(AssertionError("a Linear built on another thread landed on meta"))

    builder = threading.Thread(target=build)
    loaders = [threading.Thread(target=load) for _ in range(2)]
    builder.start()
    for thread in loaders:
        thread.start()
    for thread in loaders:
        thread.join()
    stop.set()
    builder.join()
    assert not errors, errors
    assert len(results) == 6 and all(torch.equal(r, want) for r in results)
    assert nn.Module.register_parameter is original


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory):
    """An AWQ checkpoint whose o_proj keeps an act_scale (grouped-query attention)."""
    model = tiny_llama(0)
    data = [torch.randint(0, 320, (1, 32)) for _ in range(2)]
    quantize_(model, awqtensor.awq_config(group_size=32, n_samples=2, seq_len=32, n_grid=4), calibration_data=data)
    path = tmp_path_factory.mktemp("awq") / "ckpt"
    save_quantized(model, path)
    return path


@pytest.mark.parametrize("field,edit,match", [
    ("zeros", lambda t: t.__setitem__((0, 0), 16), "zeros must hold zero points 0..15"),
    ("act_scale", lambda t: t.__setitem__(3, float("nan")), "act_scale must be finite"),
    ("scales", lambda t: t.__setitem__((1, 0), float("inf")), "scales must be finite"),
])
def test_load_quantized_refuses_each_malformed_field_even_with_matching_digests(awq_checkpoint, tmp_path, field,
                                                                               edit, match):
    tmp_path = tmp_path / "ckpt"
    shutil.copytree(awq_checkpoint, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    with safetensors.safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    name = next(n for n in sorted(tensors) if n.endswith(f".weight.{field}"))
    edit(tensors[name])
    safetensors.torch.save_file(tensors, str(file), metadata=metadata)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["digests"]["tensors"][name] = checkpoint.digest(tensors[name])
    (tmp_path / "config.json").write_text(json.dumps(config))
    weight = name.rsplit(".", 1)[0]
    with pytest.raises(ValueError, match=rf"{re.escape(weight)}: .*{match}"):
        load_quantized(tmp_path)
