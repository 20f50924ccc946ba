"""The tensor-subclass conformance suite: compile, serialization, moves, slicing, copy_."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference
from awqtensor import Int4AWQTensor, packing, quantize_, rtn_config, serialization
from conftest import DTYPES, TOLERANCE, max_rel_err, tiny_llama


def weight(dtype=torch.float32, n=64, k=200, group_size=64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return Int4AWQTensor.from_float((torch.randn(n, k, generator=g) * 0.1).to(dtype), group_size, **kw)


def test_fields_and_repr():
    t = weight(n=48, k=200, group_size=64)
    assert t.plain_qweight().shape == (48, 128) and t.qweight.dtype == torch.uint8  # 4 groups of 64 = 256 codes
    assert t.scales.shape == (48, 4) and t.zeros.shape == (48, 4) and t.act_scale is None
    assert t.shape == (48, 200) and t.dtype == torch.float32 and not t.requires_grad
    assert "group_size=64" in repr(t) and "asymmetric" in repr(t)


def test_unsupported_op_names_itself():
    t = weight()
    with pytest.raises(NotImplementedError, match="add"):
        torch.add(t, 1.0)
    with pytest.raises(NotImplementedError, match="dim 0"):
        t[:, :10]


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_moves_repack_and_preserve_codes(dtype):
    t = weight(torch.float32, n=64, k=192, group_size=64)
    moved = t.to(dtype)
    assert isinstance(moved, Int4AWQTensor) and moved.dtype == dtype
    assert moved.packing_format == packing.choose_packing(torch.device("cpu"), dtype, 64, 64)
    codes = lambda u: packing.codes(u.qweight, u.k_padded, u.packing_format, u.scales.shape[1])
    assert torch.equal(codes(moved), codes(t))
    assert torch.equal(moved.scales, t.scales.to(dtype))
    back = moved.to(torch.float32)
    assert torch.equal(codes(back), codes(t))
    assert t.to("cpu") is t or torch.equal(t.to("cpu").qweight, t.qweight)


def test_module_to_dtype_keeps_int4_weights():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    quantize_(model, rtn_config(group_size=32), filter_fn=lambda m, n: isinstance(m, nn.Linear))
    x = torch.randn(4, 128)
    y32 = model(x)
    model.to(torch.bfloat16)
    assert isinstance(model[0].weight, Int4AWQTensor) and model[0].weight.dtype == torch.bfloat16
    assert max_rel_err(model(x.bfloat16()), y32) < 3e-2


@pytest.mark.parametrize("packing_format", [packing.PLAIN, packing.CPU_INT4PACK, packing.CPU_BLOCKS])
def test_slicing_output_rows(packing_format, monkeypatch):
    disable = {packing.PLAIN: "cpu_blocks,cpu_int4pack_mm", packing.CPU_INT4PACK: "cpu_blocks"}
    if packing_format in disable:
        monkeypatch.setenv("AWQTENSOR_DISABLE", disable[packing_format])
    t = weight(n=64, k=200)
    assert t.packing_format == packing_format
    part = t[16:48]
    assert isinstance(part, Int4AWQTensor) and part.shape == (32, 200)
    torch.testing.assert_close(part.dequantize(), t.dequantize()[16:48], rtol=0, atol=0)
    x = torch.randn(3, 200, dtype=t.dtype)
    assert max_rel_err(F.linear(x, part), reference.linear_as_computed(x, t)[:, 16:48]) < TOLERANCE[t.dtype]
    if packing_format == packing.PLAIN:  # canonical rows are views: slicing aliases
        assert part.qweight.untyped_storage().data_ptr() == t.qweight.untyped_storage().data_ptr()


def test_copy_between_packings_and_errors():
    src = weight(torch.float32, n=64, k=128, seed=1)
    dst = weight(torch.bfloat16, n=64, k=128, seed=2)
    assert dst.packing_format == packing.choose_packing(torch.device("cpu"), torch.bfloat16, 64, 64)
    dst.copy_(src)
    assert torch.equal(dst.dequantize(), src.to(torch.bfloat16).dequantize())
    with pytest.raises(ValueError, match="group_size"):
        dst.copy_(weight(n=64, k=128, group_size=32))
    with pytest.raises(ValueError, match="zeros"):
        dst.copy_(weight(n=64, k=128, zero_point=False))
    with pytest.raises(TypeError, match="quantize_"):
        dst.copy_(torch.randn(64, 128))


def test_clone_and_detach_are_independent_copies():
    t = weight()
    c = t.clone()
    assert isinstance(c, Int4AWQTensor) and torch.equal(c.qweight, t.qweight)
    assert c.qweight.data_ptr() != t.qweight.data_ptr()
    assert isinstance(t.detach(), Int4AWQTensor)


def test_linear_argument_forms_and_errors():
    t = weight(n=48, k=200)
    x, b = torch.randn(3, 200), torch.randn(48)
    expected = x.double() @ t.dequantize().double().T + b.double()
    for y in (F.linear(x, t, b), F.linear(x, t, bias=b), F.linear(input=x, weight=t, bias=b)):
        assert (y.double() - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert torch.equal(F.linear(x, t, b), F.linear(x, weight=t, bias=b))
    with pytest.raises(TypeError, match=r"model.to\(torch.bfloat16\)"):
        F.linear(x.bfloat16(), t)
    with pytest.raises(ValueError, match="input has 199 features, the weight expects 200"):
        F.linear(x[:, :199], t)  # still inside the last (padded) group: the op alone would accept it
    with pytest.raises(TypeError, match="must be the weight"):
        F.linear(t, torch.randn(5, 48))
    # pickles do not carry the derived in_features; loading restores it
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert "_in_features" not in t.__getstate__()
    # the same weight; "cpu_blocks" dequantizes as fma(scale, q, -scale * zero): one fp32 rounding apart
    assert torch.allclose(loaded.dequantize(), t.dequantize(), rtol=1e-6, atol=1e-7)
    y = F.linear(x, loaded, b)  # the "plain" layout pickles hold: the reference path
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_flatten_is_computed_once_and_matches_torchao():
    # torch.compile's guards call __tensor_flatten__ on every call; ours caches torchao's answer
    from torchao.utils import TorchAOBaseTensor

    t = Int4AWQTensor.from_float(torch.randn(48, 96), 32, zero_point=False, act_scale=torch.rand(96) + 0.5)
    expected = TorchAOBaseTensor.__tensor_flatten__(t)
    assert expected[0] == ["qweight", "scales", "act_scale"] and expected[1]["packing_format"] == t.packing_format
    assert t.__tensor_flatten__() == expected
    names, attrs = t.__tensor_flatten__()
    names.clear(), attrs.clear()  # callers get copies
    assert t.__tensor_flatten__() == expected
    # a pickle is written in the plain layout: the cached answer must not travel with it
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded.__tensor_flatten__() == TorchAOBaseTensor.__tensor_flatten__(loaded)
    assert loaded.__tensor_flatten__()[1]["packing_format"] == loaded.packing_format


def _quantized_llama(dtype=torch.float32, **cfg):
    model = tiny_llama(**cfg).to(dtype)
    quantize_(model, rtn_config(group_size=32))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_weights_only_roundtrip(dtype):
    model = _quantized_llama(dtype)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    saved = state["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(saved, Int4AWQTensor) and saved.packing_format == packing.PLAIN
    fresh = tiny_llama(seed=123).to(dtype)  # different random weights
    quantize_(fresh, rtn_config(group_size=32))
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_safetensors_roundtrip(tmp_path):
    model = _quantized_llama()
    model.model.layers[0].mlp.down_proj.weight = nn.Parameter(
        Int4AWQTensor.from_float(torch.randn(96, 160) * 0.05, 32, act_scale=torch.rand(160) + 0.5),
        requires_grad=False)
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        expected = model(ids).logits
    path = tmp_path / "model.safetensors"
    serialization.save_file(model.state_dict(), path)
    state = serialization.load_file(path)
    fresh = tiny_llama(seed=7)
    quantize_(fresh, rtn_config(group_size=32))
    fresh.model.layers[0].mlp.down_proj.weight = nn.Parameter(
        Int4AWQTensor.from_float(torch.randn(96, 160), 32, act_scale=torch.ones(160)), requires_grad=False)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_safetensors_errors_name_the_tensor(tmp_path):
    model = _quantized_llama()
    tensors, metadata = serialization.flatten_state_dict(model.state_dict())
    name = "model.layers.1.mlp.up_proj.weight"
    broken = dict(tensors)
    del broken[f"{name}.scales"]
    with pytest.raises(ValueError, match=f"{name}.scales is missing"):
        serialization.unflatten_state_dict(broken, metadata)
    broken = dict(tensors, **{f"{name}.zeros": tensors[f"{name}.zeros"][:, :1]})
    with pytest.raises(ValueError, match=f"{name}.zeros has shape"):
        serialization.unflatten_state_dict(broken, metadata)
    path = tmp_path / "m.safetensors"
    serialization.save_file(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        serialization.load_file(path)


def _compiled_graphs(model, inputs):
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(**inputs).logits
    return out, "\n".join(g.code for g in backend.fw_graphs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_llama(dtype):
    model = _quantized_llama(dtype)
    for length in (1, 9):  # decode and prompt
        ids = torch.randint(0, 320, (2, length))
        with torch.no_grad():
            eager = model(ids).logits
        out, code = _compiled_graphs(model, {"input_ids": ids})
        assert "awqtensor.int4_linear" in code
        torch.testing.assert_close(out, eager, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)
    torch._dynamo.reset()
    with torch.no_grad():  # and through Inductor
        inductor = torch.compile(model, fullgraph=True)(ids).logits
    assert max_rel_err(inductor, eager) < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_flow_to_the_input_and_bias(dtype):
    """Adapters train on top of frozen int4 weights: d/dx and d/dbias of the int4 linear
    against float64 autograd through the dequantized weight."""
    t = weight(dtype, n=48, k=200, group_size=64, act_scale=(torch.rand(200) + 0.5).to(dtype))
    x = torch.randn(3, 5, 200, dtype=dtype, requires_grad=True)
    bias = torch.randn(48, dtype=dtype, requires_grad=True)
    upstream = torch.randn(3, 5, 48, dtype=dtype)
    (F.linear(x, t, bias) * upstream).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    w64 = torch.from_numpy(reference.dequantize(t))
    (F.linear(x64, w64, b64) * upstream.double()).sum().backward()
    assert max_rel_err(x.grad, x64.grad) < TOLERANCE[dtype]
    assert max_rel_err(bias.grad, b64.grad) < TOLERANCE[dtype]
    with torch.no_grad():  # inference takes the op directly: no graph
        assert F.linear(x, t).grad_fn is None
