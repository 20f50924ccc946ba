"""Checkpoints in and out: AutoAWQ's GEMM format (checked against an independent packer
written here with plain Python ints) and awqtensor's own format, both through
Hugging Face-style directories."""

import hashlib
import json
import pickle
import random
import re

import pytest
import safetensors.torch
import torch
from torch import nn

from awqtensor import Int4AWQTensor, awq_config, load_autoawq, load_quantized, quantize_, rtn_config
from awqtensor import save_autoawq, save_quantized
from awqtensor.autoawq import pack_columns, unpack_columns
from awqtensor import checkpoint
from conftest import max_rel_err, tiny_llama

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def ref_pack(codes: list[list[int]]) -> torch.Tensor:
    """AutoAWQ's packing written out by hand: word c of a row holds columns 8c..8c+7,
    column 8c + AWQ_ORDER[i] in bits 4i..4i+3, as a signed int32."""
    rows = []
    for row in codes:
        words = []
        for c in range(len(row) // 8):
            word = sum(row[8 * c + AWQ_ORDER[i]] << (4 * i) for i in range(8))
            words.append(word - 2**32 if word >= 2**31 else word)
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


def ref_unpack(words: torch.Tensor) -> list[list[int]]:
    out = []
    for row in words.tolist():
        codes = [0] * (8 * len(row))
        for c, word in enumerate(row):
            word &= 0xFFFFFFFF
            for i in range(8):
                codes[8 * c + AWQ_ORDER[i]] = (word >> (4 * i)) & 0xF
        out.append(codes)
    return out


def ref_dequantize(qweight, qzeros, scales, group_size) -> torch.Tensor:
    """[N, K] float64 weight from GEMM tensors: (q - zero) * scale."""
    q = torch.tensor(ref_unpack(qweight), dtype=torch.float64)  # [K, N]
    z = torch.tensor(ref_unpack(qzeros), dtype=torch.float64).repeat_interleave(group_size, 0)
    s = scales.double().repeat_interleave(group_size, 0)
    return ((q - z) * s).T


def test_packing_matches_the_hand_written_packer_bit_for_bit():
    rng = random.Random(7)
    codes = [[rng.randrange(16) for _ in range(40)] for _ in range(6)]
    codes[0][:8] = [15] * 8  # a word with the sign bit set
    packed = pack_columns(torch.tensor(codes, dtype=torch.uint8))
    assert torch.equal(packed, ref_pack(codes))
    assert unpack_columns(packed).tolist() == codes
    assert ref_unpack(packed) == codes


def _quantized_llama(zero_point=True, group_size=32, seed=0):
    model = tiny_llama(seed)
    quantize_(model, rtn_config(group_size=group_size, zero_point=zero_point))
    return model


def _tokens(seed=0):
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(seed))


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Int4AWQTensor)}


@pytest.mark.parametrize("zero_point", [True, False])
def test_save_autoawq_writes_the_format_exactly(tmp_path, zero_point):
    model = _quantized_llama(zero_point)
    save_autoawq(model, tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    for name, linear in _linears(model).items():
        w = linear.weight
        n, k = w.shape
        assert tensors[f"{name}.qweight"].dtype == torch.int32 and tensors[f"{name}.qweight"].shape == (k, n // 8)
        assert tensors[f"{name}.qzeros"].shape == (k // 32, n // 8)
        assert tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.scales"].shape == (k // 32, n)
        if not zero_point:
            assert set(sum(ref_unpack(tensors[f"{name}.qzeros"]), [])) == {8}
        rebuilt = ref_dequantize(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], 32)
        # our weight with its scales rounded to fp16, as the format stores them
        # (from the canonical codes: a backend layout may carry its own copy of the scales)
        expected = Int4AWQTensor(w.plain_qweight(), w.scales.half().float(), w.group_size, w.shape, "plain",
                                 w.zeros).dequantize()
        assert max_rel_err(rebuilt, expected) < 1e-6


def _hub_style_checkpoint(path, group_size=32, seed=0):
    """An AutoAWQ checkpoint made without awqtensor: random codes, zeros and fp16 scales
    packed by the hand-written packer, and a float model's other weights."""
    model = tiny_llama(seed).half()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            n, k = m.weight.shape
            codes = torch.randint(0, 16, (k, n), generator=gen).tolist()
            zeros = torch.randint(0, 16, (k // group_size, n), generator=gen).tolist()
            tensors[f"{name}.qweight"] = ref_pack(codes)
            tensors[f"{name}.qzeros"] = ref_pack(zeros)
            tensors[f"{name}.scales"] = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 1e-3).half()
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if f"{owner}.qweight" not in tensors:
            tensors[name] = t.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                     "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_load_then_save_autoawq_is_bit_exact_and_matches_the_dequantized_float_model(tmp_path, monkeypatch):
    original = _hub_style_checkpoint(tmp_path / "hub")
    model = load_autoawq(tmp_path / "hub")
    assert model.dtype == torch.float16
    assert len(_linears(model)) == 14
    save_autoawq(model, tmp_path / "again", shard_size="20KB")  # forces shards and an index
    assert (tmp_path / "again" / "model.safetensors.index.json").is_file()
    again = {}
    for file in (tmp_path / "again").glob("model-*.safetensors"):
        again.update(safetensors.torch.load_file(file))
    assert set(again) == set(original)
    for name, t in original.items():
        assert again[name].dtype == t.dtype and torch.equal(again[name], t), name

    # The loaded model computes what a float model holding the dequantized weights computes
    # (with exact matmuls: the CPU kernel's int8 activations are tested in test_cpu_kernel).
    monkeypatch.setenv("AWQTENSOR_DISABLE", "cpu_blocks")
    loaded32 = load_autoawq(tmp_path / "hub", dtype=torch.float32)
    dense = tiny_llama(0)
    state = {n: t.float() for n, t in original.items() if not n.endswith(("qweight", "qzeros", "scales"))}
    for name in _linears(loaded32):
        state[f"{name}.weight"] = ref_dequantize(original[f"{name}.qweight"], original[f"{name}.qzeros"],
                                                 original[f"{name}.scales"], 32).float()
    dense.load_state_dict(state, strict=False)
    dense.tie_weights()
    with torch.no_grad():
        expected, actual = dense(_tokens()).logits, loaded32(_tokens()).logits
    assert max_rel_err(actual, expected) < 1e-4


def test_autoawq_round_trip_of_our_own_quantization(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQTENSOR_DISABLE", "cpu_blocks")  # exact matmuls: fp16 scales are the only difference
    model = _quantized_llama()
    save_autoawq(model, tmp_path, dtype=torch.float32)
    loaded = load_autoawq(tmp_path)
    assert loaded.dtype == torch.float32
    for name, linear in _linears(model).items():
        got = dict(loaded.named_modules())[name].weight
        assert torch.equal(got.zeros, linear.weight.zeros)
        assert torch.equal(got.plain_qweight(), linear.weight.plain_qweight())
    with torch.no_grad():
        assert max_rel_err(loaded(_tokens()).logits, model(_tokens()).logits) < 1e-3  # fp16 scales


def test_save_autoawq_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="no Int4AWQTensor"):
        save_autoawq(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="not a multiple of its group size"):
        save_autoawq(_quantized_llama(group_size=64), tmp_path)  # K=96 pads to 128
    model = tiny_llama()
    quantize_(model, rtn_config(group_size=32), filter_fn=lambda m, n: n.endswith("q_proj"))
    linear = model.model.layers[0].self_attn.q_proj
    w = linear.weight
    linear.weight = nn.Parameter(w._replace(act_scale=torch.rand(96) + 0.5), requires_grad=False)
    with pytest.raises(ValueError, match="activation scale.*save_quantized"):
        save_autoawq(model, tmp_path)


def _corrupt(path, how, missing="qzeros"):
    """Truncate model.safetensors, drop the first tensor whose name ends with ``missing``,
    or cut a scales tensor short."""
    file = path / "model.safetensors"
    if how == "truncated":
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    elif how == "missing":
        tensors = safetensors.torch.load_file(file)
        del tensors[next(n for n in tensors if n.endswith(missing))]
        safetensors.torch.save_file(tensors, str(file))
    elif how == "shape":
        tensors = safetensors.torch.load_file(file)
        name = next(n for n in tensors if n.endswith("scales"))
        tensors[name] = tensors[name][:, :8].contiguous()
        safetensors.torch.save_file(tensors, str(file))


@pytest.mark.parametrize("how,match", [("truncated", "truncated"), ("missing", r"qzeros is missing"),
                                       ("shape", r"scales has shape")])
def test_load_autoawq_names_what_is_wrong(tmp_path, how, match):
    _hub_style_checkpoint(tmp_path)
    _corrupt(tmp_path, how)
    with pytest.raises(ValueError, match=match):
        load_autoawq(tmp_path)


@pytest.mark.parametrize("change,match", [({"version": "gemv"}, "'gemv' is not supported"),
                                          ({"bits": 8}, "8-bit"), ({"quant_method": "gptq"}, "not an AutoAWQ")])
def test_load_autoawq_refuses_other_variants(tmp_path, change, match):
    _hub_style_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_autoawq(tmp_path)


def test_native_round_trip_is_identical_sharded_and_never_unpickles(tmp_path, monkeypatch):
    model = tiny_llama(3)
    quantize_(model, awq_config(group_size=32, n_samples=4, seq_len=16, n_grid=4),
              calibration_data=torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(1)))
    save_quantized(model, tmp_path, shard_size="30KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    def no_pickle(*args, **kwargs):
        raise AssertionError("a load path unpickled")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_quantized(tmp_path)
    for name, linear in _linears(model).items():
        got = dict(loaded.named_modules())[name].weight
        assert isinstance(got, Int4AWQTensor)
        assert torch.equal(got.dequantize(), linear.weight.dequantize())
    with torch.no_grad():
        assert torch.equal(loaded(_tokens()).logits, model(_tokens()).logits)


@pytest.mark.parametrize("how,match", [("truncated", "truncated"), ("missing", "is missing"),
                                       ("config", r"shape .* config implies|has shape")])
def test_load_quantized_names_what_is_wrong(tmp_path, how, match):
    save_quantized(_quantized_llama(), tmp_path)
    if how != "config":
        _corrupt(tmp_path, how, missing="up_proj.weight.scales")
    else:  # a config that does not match the weights
        config = json.loads((tmp_path / "config.json").read_text())
        config["intermediate_size"] = 192
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_quantized(tmp_path)


def test_loaders_tell_the_formats_apart(tmp_path):
    save_quantized(_quantized_llama(), tmp_path / "native")
    _hub_style_checkpoint(tmp_path / "hub")
    with pytest.raises(ValueError, match="load_quantized"):
        load_autoawq(tmp_path / "native")
    with pytest.raises(ValueError, match="load_autoawq"):
        load_quantized(tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_quantized(tmp_path)


def _layout(file):
    """(where the data region starts, {tensor: (begin, end)} within it), read from the
    safetensors header by hand: an 8-byte little-endian length, then that much JSON."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + length])
    header.pop("__metadata__", None)
    return 8 + length, {name: tuple(info["data_offsets"]) for name, info in header.items()}


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


# safetensors' dtype names -> torch's, written out here so the digest is checked independently.
_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8", "I8": "int8", "I32": "int32",
                "I64": "int64"}


def test_save_quantized_records_a_digest_of_every_stored_tensors_dtype_shape_and_bytes(tmp_path):
    save_quantized(_quantized_llama(), tmp_path)
    file = tmp_path / "model.safetensors"
    data, (start, layout) = file.read_bytes(), _layout(file)
    header = json.loads(data[8: start])
    recorded = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["digests"]
    assert recorded["scheme"] == "sha256(dtype,shape,bytes)"
    assert set(recorded["tensors"]) == set(layout)  # float tensors (embedding, norms) included
    for name, (begin, end) in layout.items():
        prefix = f"{_TORCH_NAMES[header[name]['dtype']]}{header[name]['shape']}".encode()
        assert recorded["tensors"][name] == hashlib.sha256(prefix + data[start + begin: start + end]).hexdigest(), name


def test_every_flipped_bit_in_the_tensor_data_is_caught_and_named(tmp_path):
    save_quantized(_quantized_llama(), tmp_path)
    file = tmp_path / "model.safetensors"
    original = file.read_bytes()
    start, layout = _layout(file)
    rng = random.Random(0)
    # A tensor first, then a byte in it: uniform positions would nearly all land in the embedding.
    for hit in rng.sample(sorted(layout), 20):
        begin, end = layout[hit]
        flipped = bytearray(original)  # a fresh copy each time
        flipped[start + rng.randrange(begin, end)] ^= 1 << rng.randrange(8)
        file.write_bytes(flipped)
        with pytest.raises(ValueError, match=rf"model.safetensors: {re.escape(hit)} does not match its "
                                             rf"recorded digest \(dtype, shape and bytes\); the checkpoint is corrupted"):
            load_quantized(tmp_path)


def test_verify_false_loads_a_corrupted_checkpoint_as_it_is(tmp_path):
    model = _quantized_llama()
    save_quantized(model, tmp_path)
    file = tmp_path / "model.safetensors"
    start, layout = _layout(file)
    name = "model.layers.1.mlp.down_proj"
    data = bytearray(file.read_bytes())
    data[start + layout[f"{name}.weight.qweight"][0]] ^= 0x10  # the second code of row 0
    file.write_bytes(data)
    with pytest.raises(ValueError, match="corrupted"):
        load_quantized(tmp_path)
    loaded = load_quantized(tmp_path, verify=False)
    got, saved = loaded.get_submodule(name).weight, model.get_submodule(name).weight
    assert not torch.equal(got.dequantize(), saved.dequantize())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_scale_is_refused_on_save_and_on_load(tmp_path, bad):
    name = "model.layers.0.self_attn.o_proj.weight"
    model = _quantized_llama()
    w = model.get_submodule(name[: -len(".weight")]).weight
    scales = w.scales.clone()
    scales[3, 1] = bad
    with pytest.raises(ValueError, match="scales must be finite"):  # no such tensor can be made
        w._replace(scales=scales)

    # Written into the file with a valid digest: only the finiteness check can catch it.
    save_quantized(model, tmp_path)
    file = tmp_path / "model.safetensors"
    with safetensors.safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(file)
    tensors[f"{name}.scales"][3, 1] = bad
    safetensors.torch.save_file(tensors, str(file), metadata=metadata)
    digest = checkpoint.digest(tensors[f"{name}.scales"])
    _edit_config(tmp_path, lambda qc: qc["digests"]["tensors"].update({f"{name}.scales": digest}))
    for verify in (True, False):
        with pytest.raises(ValueError, match=rf"{name}: .*scales must be finite.* the checkpoint is corrupted"):
            load_quantized(tmp_path, verify=verify)


UP = "model.layers.0.mlp.up_proj.weight"
DISAGREEING = {  # config.json edit, the saved model's zero_point, the error
    "group_size": (lambda qc: qc["weights"][UP].update(group_size=64), True,
                   f"says group_size 64 for {UP}, but its stored tensors have group_size 32"),
    "zero_point": (lambda qc: qc["weights"][UP].update(zero_point=False), True, "zero_point False .* zero_point True"),
    "symmetric": (lambda qc: qc["weights"][UP].update(zero_point=True), False, "zero_point True .* zero_point False"),
    "bits": (lambda qc: qc["weights"][UP].update(bits=8), True, "bits 8 .* bits 4"),
    "shape": (lambda qc: qc["weights"][UP].update(shape=[160, 64]), True, r"shape \[160, 64\] .* shape \[160, 96\]"),
    "top-level group_size": (lambda qc: qc.update(group_size=128), True, "group_size 128 .* group_size 32"),
    "top-level zero_point": (lambda qc: qc.update(zero_point=False), True, "zero_point False .* zero_point True"),
    "unlisted": (lambda qc: qc["weights"].pop(UP), True,
                 f"hold quantized {UP}, which config.json's quantization_config does not list"),
}


@pytest.mark.parametrize("case", DISAGREEING)
def test_a_config_that_disagrees_with_the_stored_tensors_names_both_values(tmp_path, case):
    edit, zero_point, match = DISAGREEING[case]
    save_quantized(_quantized_llama(zero_point), tmp_path)
    _edit_config(tmp_path, edit)
    for verify in (True, False):
        with pytest.raises(ValueError, match=match):
            load_quantized(tmp_path, verify=verify)


def test_settings_stated_once_for_all_weights_load_when_they_agree(tmp_path):
    save_quantized(_quantized_llama(group_size=-1), tmp_path)  # one group per row: K is 96 or 160
    _edit_config(tmp_path, lambda qc: qc.update(bits=4, group_size=-1, zero_point=True))
    load_quantized(tmp_path)


def test_a_checkpoint_saved_before_digests_loads_only_when_told_to_skip_verification(tmp_path):
    """What an older save_quantized wrote: no digests (or only the bytes' SHA-256), weights
    described by group_size and shape only, in config.json and in the safetensors header."""
    model = _quantized_llama()
    save_quantized(model, tmp_path)

    def old_weights(weights):
        return {name: {"group_size": w["group_size"], "shape": w["shape"]} for name, w in weights.items()}

    def old_config(qc):
        del qc["digests"]
        qc["weights"] = old_weights(qc["weights"])

    _edit_config(tmp_path, old_config)
    file = tmp_path / "model.safetensors"
    with safetensors.safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    metadata["awqtensor"] = json.dumps(old_weights(json.loads(metadata["awqtensor"])))
    safetensors.torch.save_file(safetensors.torch.load_file(file), str(file), metadata=metadata)
    with pytest.raises(ValueError, match=r"records no digests .* load_quantized\(path, verify=False\) .* save it again"):
        load_quantized(tmp_path)
    _edit_config(tmp_path, lambda qc: qc.update(sha256={}))
    with pytest.raises(ValueError, match=r"an older awqtensor recorded only the bytes' SHA-256"):
        load_quantized(tmp_path)
    loaded = load_quantized(tmp_path, verify=False)
    with torch.no_grad():
        assert torch.equal(loaded(_tokens()).logits, model(_tokens()).logits)
