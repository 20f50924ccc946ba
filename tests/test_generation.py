"""awqtensor.generate and fast_generate_ against transformers' own generate."""

import pytest
import torch

from awqtensor import fast_generate_, fuse_, generate, quantize_, quantize_head_, rtn_config
from awqtensor import generation
from conftest import tiny_llama


def quantized_llama(**overrides):
    model = tiny_llama(tie_word_embeddings=True, **overrides)
    quantize_(model, rtn_config(group_size=32))
    fuse_(model)
    quantize_head_(model)
    return model


def reference(model, ids, n, **kwargs):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, disable_compile=True, **kwargs)


@pytest.mark.parametrize("compile, native", [(False, False), (True, False), ("max", False), (True, True)])
def test_greedy_matches_transformers(compile, native):
    model = quantized_llama()
    ids = torch.randint(3, 320, (1, 7))
    expected = reference(model, ids, 12)
    out = generate(model, ids, 12, compile=compile, native=native)
    assert torch.equal(out, expected)
    if compile:  # a second call reuses the step and its cache (reset in between)
        assert torch.equal(generate(model, ids, 12, compile=compile, native=native), expected)
        generation.reset(model)
        torch._dynamo.reset()


def test_float_model_and_batch_rows_match_single_rows():
    model = tiny_llama()
    ids = torch.randint(3, 320, (3, 5))
    out = generate(model, ids, 6, compile=False)
    assert out.shape == (3, 11) and torch.equal(out[:, :5], ids)
    for row in range(3):
        assert torch.equal(out[row], generate(model, ids[row:row + 1], 6, compile=False)[0])


def test_eos_stops_and_pads():
    model = tiny_llama()
    ids = torch.randint(3, 320, (2, 4))
    free = generate(model, ids, 8, compile=False)
    eos = int(free[0, 6])  # the third new token of row 0
    out = generate(model, ids, 8, eos_token_id=eos, compile=False)
    assert out.shape[1] <= free.shape[1]
    assert torch.equal(out[0, :7], free[0, :7]) and (out[0, 7:] == eos).all()


def test_sampling_is_seeded_and_top_k_bounded():
    model = tiny_llama()
    ids = torch.randint(3, 320, (1, 4))
    a = generate(model, ids, 10, temperature=1.0, top_k=5, compile=False, generator=torch.Generator().manual_seed(1))
    b = generate(model, ids, 10, temperature=1.0, top_k=5, compile=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = generate(model, ids, 10, compile=False)
    assert not torch.equal(a, greedy)  # 10 samples from 5 candidates each: a different sequence


def test_fast_generate_keeps_transformers_results(monkeypatch):
    model = quantized_llama()
    ids = torch.randint(3, 320, (2, 6))
    expected = reference(model, ids, 8)
    fast_generate_(model)
    assert model.generation_config.cache_implementation == "static"
    plans = []  # its decode steps run through the C++ step: one plan for transformers' cache
    monkeypatch.setattr(generation.native, "plan", lambda *a, plan=generation.native.plan: plans.append(plan(*a))
                        or plans[-1])
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected) and len(plans) == 1
    # left padding: rows at different positions go to the compiled forward, same tokens
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    want = reference(model, ids, 6, attention_mask=mask)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False),
                       want)
    torch._dynamo.reset()


def test_bad_input_says_what_to_change():
    model = tiny_llama()
    with pytest.raises(ValueError, match="integer"):
        generate(model, torch.randn(1, 4), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.randint(0, 320, (1, 4)), 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.randint(0, 320, (1, 100)), 100)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.randint(0, 320, (1, 4)), 4, temperature=-1.0)


def test_two_models_of_one_architecture_get_their_own_graphs():
    """Guards on module attributes are skipped, so a graph compiled for one model must not
    serve another of the same code with different weights (float here, int4 there)."""
    ids = torch.randint(3, 320, (1, 5))
    float_model, quantized = tiny_llama(tie_word_embeddings=True), quantized_llama()
    expected = [reference(float_model, ids, 6), reference(quantized, ids, 6)]
    assert torch.equal(generate(float_model, ids, 6, native=False), expected[0])
    assert torch.equal(generate(quantized, ids, 6, native=False), expected[1])
    fast_generate_(float_model), fast_generate_(quantized)
    for model, want in zip((float_model, quantized), expected):
        assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), want)
    torch._dynamo.reset()


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_decode_attention_matches_sdpa(kv_heads):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 4 // kv_heads, True, False
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, kv_heads, 40, 16), torch.randn(3, kv_heads, 40, 16)
    mask = torch.rand(3, 1, 1, 40) > 0.3  # True = attend, as sdpa_mask builds it
    mask[..., 0] = True
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    out, _ = generation._decode_attention(module, q, k, v, mask, scaling=0.3)
    assert out.shape == expected.shape == (3, 1, 4, 16)
    assert torch.allclose(out, expected, atol=1e-5)
    prompt = torch.randn(3, 4, 5, 16)  # more than one query: sdpa itself
    assert torch.equal(generation._decode_attention(module, prompt, k, v, None)[0],
                       sdpa_attention_forward(module, prompt, k, v, None)[0])


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="compile must be one of"):
        generate(tiny_llama(), torch.randint(0, 320, (1, 4)), 4, compile="fast")


def test_a_model_used_for_generation_can_be_freed():
    import gc
    import weakref

    model = quantized_llama()
    ids = torch.randint(3, 320, (1, 4))
    generate(model, ids, 3)
    fast_generate_(model)
    model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    alive = weakref.ref(model)
    del model
    gc.collect()
    torch._dynamo.reset()
    assert alive() is None


def attention_float64(q, k, v, mask, scale):
    """Per row and head, in float64 with explicit loops over heads: softmax(q.k * scale
    (+ mask)) @ v over the keys the mask lets through; mask [B or 1, H or 1, *, >= L]."""
    b, heads, _, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    out = torch.empty(b, 1, heads, d, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            kh, vh = k[i, h // (heads // kv_heads)].double(), v[i, h // (heads // kv_heads)].double()
            s = (kh @ q[i, h, 0].double()) * scale
            if mask is not None:
                row = mask[i % mask.shape[0], h % mask.shape[1], -1, :length]
                s = s.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else s + row.double()
            p = torch.exp(s - s.max())
            out[i, 0, h] = (p / p.sum()) @ vh
    return out


CPU_OP = pytest.mark.skipif(not generation._cpu_attention(), reason="awqtensor::decode_attention's C++ kernel is not built")


@CPU_OP
@pytest.mark.parametrize("isa", ["scalar", "best"])
@pytest.mark.parametrize("b,heads,kv_heads,length,d", [(1, 9, 3, 256, 64), (2, 4, 4, 37, 72), (3, 6, 2, 19, 20),
                                                      (2, 2, 1, 50, 128)])
def test_decode_attention_op_matches_float64(monkeypatch, isa, b, heads, kv_heads, length, d):
    if isa == "scalar":  # the portable path (also what a head size that is not a multiple of 8 takes)
        monkeypatch.setenv("AWQTENSOR_CPU_ISA", "scalar")
    q, k, v = torch.randn(b, heads, 1, d), torch.randn(b, kv_heads, length, d), torch.randn(b, kv_heads, length, d)
    filled = torch.rand(b, 1, 1, length + 3) > 0.4  # a static cache: longer than L, holes, per row
    filled[..., 0] = True
    per_head = torch.rand(1, heads, 2, length) > 0.5  # [1, H, Q, L]: the last query row counts
    per_head[..., 0] = True
    additive = torch.where(filled, torch.randn(filled.shape), torch.tensor(float("-inf")))
    for mask in (filled, per_head, additive, None):
        out = torch.ops.awqtensor.decode_attention(q, k, v, mask, 0.3)
        assert out.shape == (b, 1, heads, d) and out.dtype == torch.float32
        expected = attention_float64(q, k, v, mask, 0.3)
        assert (out.double() - expected).abs().max() < 1e-5 * expected.abs().max(), mask is None
    # skipped keys are never read: garbage there changes nothing
    k2, v2 = k.clone(), v.clone()
    holes = ~filled[0, 0, 0, :length]
    k2[0][:, holes] = float("nan")
    v2[0][:, holes] = float("nan")
    assert torch.equal(torch.ops.awqtensor.decode_attention(q, k2, v2, filled, 0.3),
                       torch.ops.awqtensor.decode_attention(q, k, v, filled, 0.3))


@CPU_OP
def test_decode_attention_op_dtypes_opcheck_and_bad_shapes():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    mask = torch.rand(2, 1, 1, 30) > 0.3
    mask[..., 0] = True
    expected = attention_float64(q, k, v, mask, 0.25)
    for dtype in (torch.bfloat16, torch.float16):  # through fp32, rounded once at the end
        out = torch.ops.awqtensor.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, 0.25)
        assert out.dtype == dtype
        assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max()
    torch.library.opcheck(torch.ops.awqtensor.decode_attention.default, (q, k, v, mask, 0.25))
    with pytest.raises(RuntimeError, match="query"):
        torch.ops.awqtensor.decode_attention(torch.randn(2, 4, 3, 16), k, v, mask, 0.25)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.awqtensor.decode_attention(torch.randn(2, 3, 1, 16), k, v, mask, 0.25)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.awqtensor.decode_attention(q, k, v, mask[..., :10], 0.25)
