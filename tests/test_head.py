"""The 8-bit output head (awqtensor/head.py): codes against an independent reference, the
exact hi/lo split through the int4 kernels, the tied embedding, compile, checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from awqtensor import Int4AWQTensor, Int8HeadTensor, load_quantized, quantize_, quantize_head_, rtn_config, \
    save_quantized
from conftest import max_rel_err, tiny_llama


def int8_reference(w: torch.Tensor):
    """Per-row symmetric int8 in float64: (codes, scales)."""
    w = w.double()
    scales = w.abs().amax(dim=1) / 127
    return (w / scales[:, None]).round().clamp(-128, 127), scales


@pytest.mark.parametrize("shape", [(300, 576), (97, 40), (64, 128)])
def test_codes_and_dequantize_match_reference(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different ranges
    t = Int8HeadTensor.from_float(w)
    codes, scales = t.int8()
    ref_codes, ref_scales = int8_reference(w)
    assert (codes.double() != ref_codes).float().mean() < 1e-3  # fp32 vs fp64 division may flip a tie
    assert torch.allclose(scales.double(), ref_scales, rtol=1e-6)
    # hi * 16 + lo reproduces every code: the dequantized weight is exactly codes * scale
    assert torch.allclose(t.dequantize().double(), codes.double() * scales.double()[:, None], rtol=0, atol=1e-6)
    assert max_rel_err(t.dequantize(), w) < 0.01


@pytest.mark.parametrize("m", [1, 5, 33])
def test_linear_against_float64(m):
    w, x = torch.randn(256, 200), torch.randn(m, 200)
    t = Int8HeadTensor.from_float(w)
    codes, scales = t.int8()
    expected = x.double() @ (codes.double() * scales.double()[:, None]).T
    y = F.linear(x, t)
    assert y.shape == (m, 256)
    assert max_rel_err(y, expected) < 0.02  # the CPU kernel's int8 activations (~0.6%)


def test_linear_exact_without_int8_activations(monkeypatch):
    monkeypatch.setenv("AWQTENSOR_DISABLE", "cpu_blocks")  # weights land in an exact layout
    w, x = torch.randn(128, 96), torch.randn(3, 96)
    t = Int8HeadTensor.from_float(w)
    codes, scales = t.int8()
    expected = x.double() @ (codes.double() * scales.double()[:, None]).T
    assert max_rel_err(F.linear(x, t), expected) < 1e-5


def test_tied_head_and_embedding_stay_one_parameter():
    model = tiny_llama(tie_word_embeddings=True)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        quantize_(model, rtn_config(group_size=32))
        quantize_head_(model)
        after = model(ids).logits
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert isinstance(head, Int8HeadTensor) and head is embed
    rows = torch.randint(0, 320, (7,))
    assert torch.equal(F.embedding(rows, embed), embed.dequantize()[rows])
    assert max_rel_err(after, before) < 0.1  # int4 layers + int8 head on a random model


def test_untied_head_leaves_embedding_float():
    model = tiny_llama(tie_word_embeddings=False)
    quantize_head_(model)
    assert isinstance(model.lm_head.weight, Int8HeadTensor)
    assert type(model.model.embed_tokens.weight) is torch.nn.Parameter
    assert not isinstance(model.model.embed_tokens.weight.data, Int8HeadTensor)


def test_head_error_cost_is_small_against_int4():
    """The reason for 8 bits: the head's output error is far below int4's (per channel)."""
    w, x = torch.randn(512, 192), torch.randn(16, 192)
    exact = x.double() @ w.double().T
    int8 = max_rel_err(F.linear(x, Int8HeadTensor.from_float(w)), exact)
    int4 = max_rel_err(F.linear(x, Int4AWQTensor.from_float(w, group_size=64)), exact)
    assert int8 < int4 / 4


def test_compiled_forward_matches_eager():
    model = tiny_llama(tie_word_embeddings=True)
    quantize_(model, rtn_config(group_size=32))
    quantize_head_(model)
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    # Compiled RMSNorms round some inputs an ulp differently, which can flip an int8
    # activation code in the CPU kernel (one step is 1/127 of its block's absmax): on the
    # AMX Xeon that moves a logit by ~4e-4. Anything wrong in the graph moves far more.
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2e-3 * eager.abs().max().item())


def test_bf16_move():
    model = tiny_llama(tie_word_embeddings=True)
    quantize_head_(model)
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        y32 = model(ids).logits
        model.to(torch.bfloat16)
        y16 = model(ids).logits
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.model.embed_tokens.weight
    assert max_rel_err(y16, y32) < 0.05


def test_checkpoint_round_trip(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    quantize_(model, rtn_config(group_size=32))
    quantize_head_(model)
    save_quantized(model, tmp_path / "q")
    import json

    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["weights"]["model.embed_tokens.weight"]["bits"] == 8
    assert "lm_head" not in config["quantization_config"]["modules_not_converted"]
    loaded = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert isinstance(loaded.lm_head.weight, Int8HeadTensor) and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight.int8()[0], model.lm_head.weight.int8()[0])


def test_errors_say_what_to_change():
    model = tiny_llama()
    quantize_(model, rtn_config(group_size=32), filter_fn=lambda m, n: isinstance(m, torch.nn.Linear))
    with pytest.raises(TypeError, match="already int4"):
        quantize_head_(model)
    with pytest.raises(ValueError, match="no output head"):
        quantize_head_(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(ValueError, match="NaN"):
        Int8HeadTensor.from_float(torch.full((4, 8), float("nan")))
    t = Int8HeadTensor.from_float(torch.randn(8, 16))
    with pytest.raises(TypeError, match="bfloat16"):
        F.linear(torch.randn(2, 16, dtype=torch.bfloat16), t)
