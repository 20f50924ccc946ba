"""awqtensor's C++ decode step (awqtensor.native) against the model's own forward."""

import pytest
import torch
import transformers
from transformers import StaticCache

from awqtensor import fast_generate_, fuse_, generate, generation, native, quantize_, quantize_head_, rtn_config
from awqtensor.ops import cpu_kernel

pytestmark = pytest.mark.skipif(cpu_kernel.unavailable() is not None or not cpu_kernel.binding(),
                                reason="needs awqtensor's C++ CPU op")

SMALL = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def model_of(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind](**dict(SMALL, **overrides))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a skipped or misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return model


def prepared(model, fused=True, head=True, skip=()):
    quantize_(model, rtn_config(group_size=32), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and "lm_head" not in fqn and not any(s in fqn for s in skip))
    if fused:
        fuse_(model)
    if head:
        quantize_head_(model)
    return model


@pytest.fixture(params=["exact", "int8"])
def route(request):
    """"exact": every int4 matmul through the fp32 dense route (exact products), so the plan
    must give the model's logits up to fp32 rounding; "int8": the int8 kernel, which the plan
    calls directly. There a last-bit difference upstream can flip an activation's int8
    rounding, and flips compound over layers (up to ~1% of the largest logit over a few
    tiny random models; a few % on SmolLM2): the tolerance only catches wiring errors."""
    old = cpu_kernel.dense_route(1, 0, dtype=torch.float32) if request.param == "exact" else \
        cpu_kernel.dense_route(None)
    yield request.param
    cpu_kernel.dense_route(**old)


@torch.no_grad()
def compare_steps(model, route, batch=2, prompt=5, steps=4, length=32):
    """The plan's logits and cache against the model's forward on a second cache."""
    assert native.unsupported(model, length) is None
    rtol = 1e-4 if route == "exact" else 5e-2
    ids = torch.randint(3, 320, (batch, prompt))
    caches = [StaticCache(config=model.config, max_cache_len=length) for _ in range(2)]
    for cache in caches:
        model(input_ids=ids, cache_position=torch.arange(prompt), cache=cache, use_cache=True)
    plan = native.plan(model, caches[0], length)
    token = ids[:, -1:]
    for position in range(prompt, prompt + steps):
        got = plan.step(token, position, False)
        want = model(input_ids=token, cache_position=torch.tensor([position]), cache=caches[1],
                     use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
        if route == "exact":  # the same step again, greedy: the argmax of those logits
            assert torch.equal(plan.step(token, position, True), got.argmax(-1, keepdim=True))
        token = want.argmax(-1, keepdim=True)
    for mine, theirs in zip(caches[0].layers, caches[1].layers):
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
        assert int(mine.cumulative_length) == int(theirs.cumulative_length) == prompt + steps


@pytest.mark.parametrize("kind, overrides", [
    ("llama", {}),
    ("llama", dict(attention_bias=True, mlp_bias=True)),
    ("mistral", {}),
    ("qwen2", {}),  # q/k/v biases
    ("qwen3", dict(head_dim=32)),  # q/k norms, head size not hidden / heads
])
@pytest.mark.parametrize("fused, head", [(True, True), (False, False)])
def test_step_matches_the_model(kind, overrides, fused, head, route):
    compare_steps(prepared(model_of(kind, **overrides), fused=fused, head=head), route)


def test_float_linears_act_scale_and_one_row(route):
    model = prepared(model_of("llama"), fused=False, skip=("layers.1.mlp",))  # some Linears stay float
    o = model.model.layers[0].self_attn.o_proj
    o.weight = torch.nn.Parameter(o.weight._replace(act_scale=torch.rand(96) + 0.5), requires_grad=False)
    compare_steps(model, route, batch=1)


def test_float_model():
    compare_steps(model_of("qwen3"), "exact")


@pytest.mark.parametrize("greedy", [True, False])
def test_generate_takes_it_and_matches_transformers(greedy):
    model = prepared(model_of("llama"))
    ids = torch.randint(3, 320, (2, 6))
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=4)
    if greedy:
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                                  disable_compile=True, **kwargs)
        assert torch.equal(generate(model, ids, 10), expected)
    else:  # sampling from the plan's logits: seeded, so equal to the compiled-free path's
        a = generate(model, ids, 10, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(0))
        b = generate(model, ids, 10, temperature=1.0, top_k=4, native=False, compile=False,
                     generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)
    assert any(k[0] == "native" and v is not None for k, v in generation._steps[model].items())


def test_what_it_does_not_take_says_why_and_generate_falls_back(monkeypatch):
    model = prepared(model_of("llama"))
    assert native.unsupported(model, 32) is None
    monkeypatch.setenv("AWQTENSOR_DISABLE", "native_step")
    assert "AWQTENSOR_DISABLE" in native.unsupported(model, 32)
    monkeypatch.delenv("AWQTENSOR_DISABLE")
    assert "sliding-window" in native.unsupported(model_of("mistral", sliding_window=16), 32)
    assert "fp32" in native.unsupported(model_of("llama").to(torch.bfloat16), 32)
    phi = transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL)).eval()
    assert "model_type 'phi'" in native.unsupported(phi, 32)
    hooked = model_of("llama")
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in native.unsupported(hooked, 32)
    with pytest.raises(ValueError, match="no C..? decode step for this model: .*hooks"):
        native.plan(hooked, None, 32)
    ids = torch.randint(3, 320, (1, 4))
    out = generate(hooked, ids, 5, compile=False)  # falls back to the eager step, same tokens
    assert [v for k, v in generation._steps[hooked].items() if k[0] == "native"] == [None]
    assert torch.equal(out, generate(hooked, ids, 5, compile=False, native=False))


def test_step_rejects_bad_calls():
    model = prepared(model_of("llama"))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(ValueError, match="prefill the prompt first"):
        native.plan(model, cache, 16)
    model(input_ids=torch.randint(3, 320, (2, 3)), cache_position=torch.arange(3), cache=cache, use_cache=True)
    plan = native.plan(model, cache, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        plan.step(torch.tensor([[1], [2]]), 16, True)
    with pytest.raises(RuntimeError, match="cache of batch 2"):
        plan.step(torch.tensor([[1]]), 3, True)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        plan.step(torch.tensor([[1], [320]]), 3, True)
    assert plan.step(torch.tensor([[1], [2]]), 3, True).shape == (2, 1)


class Counted:
    """A plan whose steps are counted."""

    def __init__(self, plan):
        self.plan, self.steps = plan, 0

    def step(self, *args):
        self.steps += 1
        return self.plan.step(*args)


@pytest.mark.parametrize("kind, overrides", [("qwen2", {}), ("qwen3", dict(head_dim=32)), ("mistral", {}),
                                             ("mistral", dict(sliding_window=12))])
def test_transformers_generate_after_fast_generate_(monkeypatch, kind, overrides):
    """model.generate's decode calls go through the plan (Qwen's per-layer-type masks, a
    Mistral sliding-window cache), and leave it where they must: a window of 12 over 6 +
    10 tokens rolls, and the compiled forward takes over, with the cache's counts right."""
    model = prepared(model_of(kind, **overrides))
    ids = torch.randint(3, 320, (2, 6))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, cache_implementation="static", disable_compile=True)
    fast_generate_(model)
    plans = []
    monkeypatch.setattr(native, "plan", lambda *a, plan=native.plan: plans.append(Counted(plan(*a))) or plans[-1])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False)
    torch._dynamo.reset()
    assert torch.equal(out, expected)
    assert len(plans) == 1 and plans[0].steps == (6 if "sliding_window" in overrides else 9)
