"""fuse_: Linears that read one input become one int4 GEMM, with the model's outputs
unchanged up to rounding, traceable by torch.compile(fullgraph=True)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from awqtensor import Int4AWQTensor, fuse_, quantize_, rtn_config
from awqtensor.fusion import FusedLinear, LinearSlice, concat_rows
from conftest import max_rel_err
from test_calibration import build


def quantized(arch, group_size=32, seed=0):
    model = build(arch, seed)
    quantize_(model, rtn_config(group_size=group_size))
    return model


def linear_calls(model, *args) -> int:
    counts = []

    def backend(gm, inputs):
        counts.append(sum(n.op == "call_function" and "linear" in str(n.target) for n in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=backend)(*args)
    return sum(counts)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_model_matches_and_compiles_to_fewer_gemms(arch):
    model = quantized(arch)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    unfused_calls = linear_calls(model, ids)
    fuse_(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, FusedLinear) and isinstance(attn.k_proj, LinearSlice)
    assert isinstance(mlp.gate_up_proj, FusedLinear)
    assert (attn.qkv_proj.bias is not None) == (arch == "qwen2")  # Qwen2's q/k/v carry biases
    with torch.no_grad():
        assert max_rel_err(model(ids).logits, expected) < 1e-5
    assert attn.qkv_proj._outputs is None  # nothing held between forwards
    assert linear_calls(model, ids) == unfused_calls - 3 * len(model.model.layers)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    assert max_rel_err(compiled, expected) < 1e-5
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys
    assert not any("q_proj" in k or "gate_proj" in k for k in keys)  # the fused weight is stored once


def test_a_slice_called_alone_gives_its_own_columns():
    model = quantized("qwen2")
    attn = model.model.layers[1].self_attn
    x = torch.randn(3, 96)
    with torch.no_grad():
        expected = [F.linear(x, m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        fuse_(model)
        assert torch.allclose(attn.v_proj(x), expected[2], atol=1e-6)  # out of order, alone
        assert torch.allclose(attn.k_proj(x.clone()), expected[1], atol=1e-6)  # another input tensor
        assert torch.allclose(attn.q_proj(x), expected[0], atol=1e-6)


def test_concat_rows_keeps_every_row():
    g = torch.Generator().manual_seed(4)
    parts = [Int4AWQTensor.from_float(torch.randn(n, 80, generator=g), 16) for n in (32, 16, 48)]
    whole = concat_rows(parts)
    assert whole.shape == (96, 80)
    assert torch.equal(whole.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_groups_that_differ_are_left_alone_with_a_warning():
    model = build("llama")
    attn = model.model.layers[0].self_attn
    for name, gs in (("q_proj", 32), ("k_proj", 32), ("v_proj", 16)):
        linear = getattr(attn, name)
        linear.weight = nn.Parameter(Int4AWQTensor.from_float(linear.weight.detach(), gs), requires_grad=False)
    with pytest.warns(UserWarning, match="nothing to fuse"):
        fuse_(model)  # group sizes differ, the other layers are float
    assert isinstance(attn.q_proj, nn.Linear) and not hasattr(attn, "qkv_proj")
