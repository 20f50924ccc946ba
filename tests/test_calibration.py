"""AWQ calibration: mapping discovery, folding, search quality, two-step path, robustness."""

import re

import pytest
import torch
import transformers
from torch import nn

from awqtensor import Int4AWQTensor, awq_config, quantize_, rtn_config
from awqtensor.api import conv1d_to_linear, select_linears
from awqtensor.calibration.blocks import find_blocks, first_block_inputs
from awqtensor.calibration.data import calibration_batches
from awqtensor.calibration.mappings import apply_fold, discover
from conftest import max_rel_err, sqnr_db, tiny_llama

VOCAB = 320
SMALL = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        return tiny_llama(seed)
    if arch == "llama-mha":
        return tiny_llama(seed, num_key_value_heads=4)
    if arch in ("qwen2", "mistral", "gemma"):
        cfg = getattr(transformers, {"qwen2": "Qwen2Config", "mistral": "MistralConfig", "gemma": "GemmaConfig"}[arch])
        extra = {"head_dim": 24} if arch == "gemma" else {}
        model = transformers.AutoModelForCausalLM.from_config(cfg(**SMALL, **extra))
        if arch == "gemma":  # random init leaves Gemma's (1 + w) norms at w = 0; make w matter
            for m in model.modules():
                if type(m).__name__.endswith("RMSNorm"):
                    nn.init.normal_(m.weight, 0.0, 0.3)
        return model.eval()
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=96, n_layer=2, n_head=4, n_positions=128)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if arch == "opt":
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=96, ffn_dim=160, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=96)
        return transformers.OPTForCausalLM(cfg).eval()
    raise ValueError(arch)


LLAMA_LIKE = [
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm", "self_attn"),
    (("self_attn.o_proj",), None, "act_scale", "self_attn.o_proj"),  # GQA: v has fewer outputs than o has inputs
    (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm", "mlp"),
    (("mlp.down_proj",), "mlp.up_proj", "linear", "mlp.down_proj"),
]
EXPECTED = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "llama-mha": [LLAMA_LIKE[0], (("self_attn.o_proj",), "self_attn.v_proj", "linear", "self_attn.o_proj"),
                  *LLAMA_LIKE[2:]],
    "gemma": [(m[0], m[1], "norm_one_plus" if m[2] == "norm" else m[2], m[3]) for m in LLAMA_LIKE],
    "gpt2": [
        (("attn.c_attn",), "ln_1", "norm", "attn.c_attn"),
        (("attn.c_proj",), None, "act_scale", "attn.c_proj"),
        (("mlp.c_fc",), "ln_2", "norm", "mlp.c_fc"),
        (("mlp.c_proj",), None, "act_scale", "mlp.c_proj"),  # GELU between: not foldable
    ],
    "opt": [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm", "norm", "self_attn"),
        (("self_attn.out_proj",), "self_attn.v_proj", "linear", "self_attn.out_proj"),
        (("fc1",), "final_layer_norm", "norm", "fc1"),
        (("fc2",), "fc1", "linear", "fc2"),  # ReLU is positively homogeneous: foldable
    ],
}


def calibration_ids(n=8, seq_len=32, seed=1):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def block_and_inputs(model, config=awq_config(group_size=32)):
    selected = select_linears(conv1d_to_linear(model), config)
    _, blocks = find_blocks(model, [m for _, m in selected])
    batches = calibration_batches(calibration_ids(), 8, 32)
    inputs = first_block_inputs(model, blocks[0], batches)
    ids = {id(m) for _, m in selected}
    names = [n for n, m in blocks[0].named_modules() if id(m) in ids]
    return blocks[0], inputs[0], names


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_discovery_finds_expected_mappings(arch):
    block, (args, kwargs), names = block_and_inputs(build(arch))
    found = [(m.linears, m.producer, m.fold, m.loss_module) for m in discover(block, args, kwargs, names)]
    assert found == EXPECTED[arch]


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_folding_preserves_the_float_function(arch):
    model = build(arch)
    conv1d_to_linear(model)
    ids = calibration_ids(2, 24, seed=7)
    with torch.no_grad():
        before = model(ids).logits
    block, (args, kwargs), names = block_and_inputs(model)
    mappings = discover(block, args, kwargs, names)
    _, blocks = find_blocks(model, [m for m in model.modules() if isinstance(m, nn.Linear)])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in blocks:
            for mapping in mappings:
                if mapping.fold == "act_scale":
                    continue
                linears = [b.get_submodule(n) for n in mapping.linears]
                s = torch.empty(linears[0].in_features).uniform_(0.25, 4.0, generator=gen)
                for lin in linears:
                    lin.weight.mul_(s)
                apply_fold(b, mapping, s)
        after = model(ids).logits
    assert max_rel_err(after, before) < 1e-5


def outlier_llama(seed=0):
    """A random Llama whose norms amplify a few channels, as trained LLMs' do: the case AWQ is for."""
    model = tiny_llama(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                idx = torch.randperm(m.weight.numel(), generator=gen)[:4]
                m.weight[idx] *= 20
    return model


@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_beats_rtn_on_held_aside_data(group_size):
    held = calibration_ids(4, 48, seed=99)
    reference = outlier_llama()
    with torch.no_grad():
        expected = reference(held).logits
    awq, rtn = outlier_llama(), outlier_llama()
    quantize_(awq, awq_config(group_size=group_size, n_samples=8, seq_len=32), calibration_data=calibration_ids())
    quantize_(rtn, rtn_config(group_size=group_size))
    with torch.no_grad():
        awq_sqnr, rtn_sqnr = sqnr_db(expected, awq(held).logits), sqnr_db(expected, rtn(held).logits)
    assert awq_sqnr > rtn_sqnr + 1.0, (awq_sqnr, rtn_sqnr)
    assert all(isinstance(m.weight, Int4AWQTensor) for m in awq.model.layers.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("arch", ["opt", "gpt2", "gemma"])
def test_awq_not_worse_than_rtn_on_other_architectures(arch):
    held = calibration_ids(2, 48, seed=98)
    reference, awq, rtn = build(arch), build(arch), build(arch)
    with torch.no_grad():
        expected = reference(held).logits
    quantize_(awq, awq_config(group_size=32, n_samples=8, seq_len=32), calibration_data=calibration_ids())
    quantize_(rtn, rtn_config(group_size=32))
    with torch.no_grad():
        assert sqnr_db(expected, awq(held).logits) > sqnr_db(expected, rtn(held).logits)


class TwoHeads(nn.Module):
    """Not a transformers model: GELU, then two Linears reading its output."""

    def __init__(self, width=64):
        super().__init__()
        self.act = nn.GELU()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = self.act(x)
        return x + self.a(h) * torch.sigmoid(self.b(h))


class Stack(nn.Module):
    def __init__(self, width=64, depth=2):
        super().__init__()
        self.layers = nn.ModuleList(TwoHeads(width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_any_module_shares_one_act_scale_per_input():
    torch.manual_seed(0)
    model = Stack()
    data = [{"x": torch.randn(4, 16, 64)} for _ in range(2)]
    quantize_(model, awq_config(group_size=32), calibration_data=data)
    for layer in model.layers:
        a, b = layer.a.weight, layer.b.weight
        assert isinstance(a, Int4AWQTensor) and a.act_scale is not None
        assert torch.equal(a.act_scale, b.act_scale)
        assert not torch.equal(a.act_scale, torch.ones_like(a.act_scale))


def test_nan_activations_fall_back_to_rtn_without_nan():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(4, 16, 64)
    x[0, 3, 5] = float("nan")
    with pytest.warns(UserWarning) as caught:
        quantize_(model, awq_config(group_size=32), calibration_data=[{"x": x}])
    # the NaN reaches block 1 through block 0's output: both fall back, each says so
    warned = " ".join(str(w.message) for w in caught)
    assert re.search(r"layers\.0\..*NaN/Inf", warned) and re.search(r"layers\.1\..*NaN/Inf", warned), warned
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            assert torch.isfinite(w.scales).all() and torch.isfinite(w.dequantize()).all()


def test_model_without_blocks_is_calibrated_whole_with_a_warning():
    torch.manual_seed(0)
    model = TwoHeads()
    with pytest.warns(UserWarning, match="no repeated blocks"):
        quantize_(model, awq_config(group_size=32), calibration_data=[{"x": torch.randn(2, 8, 64)}])
    assert isinstance(model.a.weight, Int4AWQTensor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_calibrates_in_fp32(dtype):
    held = calibration_ids(2, 32, seed=5)
    reference = outlier_llama()
    with torch.no_grad():
        expected = reference(held).logits
    model = outlier_llama().to(dtype)
    quantize_(model, awq_config(group_size=32, n_samples=8, seq_len=32), calibration_data=calibration_ids())
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == dtype and torch.isfinite(w.scales).all()
    with torch.no_grad():
        assert sqnr_db(expected, model(held).logits.float()) > 10


def test_two_step_agrees_with_one_call_mappings_and_beats_rtn():
    held = calibration_ids(4, 48, seed=99)
    reference = outlier_llama()
    with torch.no_grad():
        expected = reference(held).logits
    block, (args, kwargs), names = block_and_inputs(outlier_llama())
    one_call = discover(block, args, kwargs, names)

    model = outlier_llama()
    quantize_(model, awq_config(group_size=32, step="prepare"))
    with torch.no_grad():
        for batch in calibration_ids().split(4):
            model(batch)
    assert [m for _, m in model._awq_mappings] == [one_call, one_call]
    quantize_(model, awq_config(group_size=32, step="convert"))
    assert not hasattr(model, "_awq_mappings")
    assert not any(hasattr(m, "_awq_observer") for m in model.modules())
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.act_scale is None  # folded into the norm
    assert attn.o_proj.weight.act_scale is not None  # GQA: nothing to fold into
    rtn = outlier_llama()
    quantize_(rtn, rtn_config(group_size=32))
    with torch.no_grad():
        assert sqnr_db(expected, model(held).logits) > sqnr_db(expected, rtn(held).logits) + 1.0


def test_two_step_through_torchao_shares_scales():
    from torchao.quantization import quantize_ as torchao_quantize_

    model = outlier_llama()
    torchao_quantize_(model, awq_config(group_size=32, step="prepare"))
    with torch.no_grad():
        model(calibration_ids())
    torchao_quantize_(model, awq_config(group_size=32, step="convert"))
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert torch.equal(attn.q_proj.weight.act_scale, attn.v_proj.weight.act_scale)
    assert torch.equal(mlp.gate_proj.weight.act_scale, mlp.up_proj.weight.act_scale)
    assert not torch.equal(attn.q_proj.weight.act_scale, mlp.up_proj.weight.act_scale)
    with pytest.raises(ValueError, match="two steps"):
        torchao_quantize_(tiny_llama(), awq_config(group_size=32))


def test_convert_without_forwards_says_so():
    model = tiny_llama()
    quantize_(model, awq_config(group_size=32, step="prepare"))
    with pytest.raises(RuntimeError, match="run forward passes"):
        quantize_(model, awq_config(group_size=32, step="convert"))


@pytest.mark.parametrize("data,kwargs,error,match", [
    (None, {}, ValueError, "needs calibration data"),
    ([], {}, ValueError, "empty"),
    (torch.randint(0, VOCAB, (1, 20)), {}, ValueError, "fewer than one sequence"),
    (["some text"], {}, TypeError, "tokenizer="),
    (torch.full((2, 40), VOCAB + 5), {}, ValueError, "tokenize with this model's tokenizer"),
])
def test_bad_calibration_data(data, kwargs, error, match):
    model = tiny_llama()
    with pytest.raises(error, match=match):
        quantize_(model, awq_config(group_size=32, seq_len=32), calibration_data=data, **kwargs)
    assert not any(isinstance(p, Int4AWQTensor) for p in model.parameters())


def test_too_few_samples_warns_and_strings_are_tokenized():
    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return type("Out", (), {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])})()

    model = tiny_llama()
    with pytest.warns(UserWarning, match="fewer than n_samples"):
        quantize_(model, awq_config(group_size=32, seq_len=32, n_samples=16),
                  calibration_data=["calibration text " * 20], tokenizer=CharTokenizer())
    assert isinstance(model.model.layers[0].mlp.down_proj.weight, Int4AWQTensor)


@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 80), (-1, 48)])
def test_group_second_moments_give_the_exact_partial_output_error(group_size, k):
    from awqtensor.calibration.search import group_grams

    gen = torch.Generator().manual_seed(k)
    x, e = torch.randn(200, k, generator=gen, dtype=torch.float64), torch.randn(7, k, generator=gen, dtype=torch.float64)
    gs = k if group_size == -1 else group_size
    grams = group_grams(x, group_size).double()
    e_pad = torch.nn.functional.pad(e, (0, grams.shape[0] * gs - k)).reshape(7, -1, gs)
    via_moments = torch.einsum("ngi,gij,ngj->ng", e_pad, grams, e_pad)
    x_pad = torch.nn.functional.pad(x, (0, grams.shape[0] * gs - k)).reshape(200, -1, gs)
    direct = torch.einsum("tgi,ngi->tng", x_pad, e_pad).pow(2).sum(0)
    assert torch.allclose(via_moments, direct, rtol=1e-4)


@pytest.mark.parametrize("zero_point", [True, False])
def test_clipping_lowers_the_output_error(zero_point):
    from awqtensor import quant
    from awqtensor.calibration.search import clip_weight, group_grams, search_clip

    torch.manual_seed(int(zero_point))
    gen = torch.Generator().manual_seed(int(zero_point))
    x = torch.randn(512, 128, generator=gen)
    w = torch.distributions.StudentT(3.0).sample((48, 128))  # heavy tails stretch the groups' ranges
    lo, hi = search_clip(w, group_grams(x, 32), 32, zero_point, 0.5, 20)
    clipped = clip_weight(w, lo, hi, 32, zero_point)
    assert not torch.equal(clipped, w)

    def output_error(weight):
        return (x @ (quant.fake_quantize(weight, 32, zero_point) - w).T).pow(2).sum()

    assert output_error(clipped) < 0.97 * output_error(w)


@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 80)])
def test_lone_linear_loss_from_second_moments_equals_recorded_output_mse(group_size, k):
    """A lone Linear's loss comes from Σ xᵀx with nothing recorded (when that matrix is the
    smaller); it must equal the MSE
    that recording its outputs gives (the same Linear wrapped so the wrapper is the loss module)."""
    from awqtensor import quant
    from awqtensor.calibration.awq import _Capture
    from awqtensor.calibration.mappings import Mapping
    from awqtensor.calibration.search import group_grams

    torch.manual_seed(k)
    block = nn.Sequential(nn.Sequential(nn.Linear(k, 24)))
    inputs = [((torch.randn(4, 40, k) * torch.rand(k) * 4,), {}) for _ in range(3)]
    lone = _Capture(block, Mapping(("0.0",), None, "act_scale", "0.0"), inputs, group_size, {0, 1, 2})
    recorded = _Capture(block, Mapping(("0.0",), None, "act_scale", "0"), inputs, group_size, {0, 1, 2})
    assert lone.lone and not lone.records and not recorded.lone and len(recorded.records) == 3
    # With few tokens the K x K moments would outweigh the records: it records instead.
    few = [((inputs[0][0][0][:1, :10],), {})]
    assert not _Capture(block, Mapping(("0.0",), None, "act_scale", "0.0"), few, group_size, {0}).lone
    x = torch.cat([a[0].reshape(-1, k) for a, _ in inputs])
    expected = group_grams(x, group_size).double()
    atol = 1e-5 * expected.abs().max().item()  # fp32 products: compare at the scale of the largest moment
    assert torch.allclose(lone.stats.grams, expected, rtol=1e-5, atol=atol)
    assert torch.allclose(lone.stats.grams, recorded.stats.grams, rtol=1e-5, atol=atol)
    linear = block[0][0]
    linear.weight.data = quant.fake_quantize(linear.weight.data, group_size, True)
    assert lone.loss() > 0
    assert lone.loss() == pytest.approx(recorded.loss(), rel=1e-4)


ROUTES = {  # how the CPU op would serve the calibration's calls of 64 rows
    "int8 kernel": dict(min_m=None),
    "fp32 dense": dict(min_m=1, min_macs=0, dtype=torch.float32),
    "bf16 dense": dict(min_m=1, min_macs=0, dtype=torch.bfloat16),
    "reference": dict(min_m=None),  # with AWQTENSOR_DISABLE=cpu_blocks
}


@pytest.mark.filterwarnings("ignore:awqtensor. activations='int8' weights run weight-only")
@pytest.mark.parametrize("activations", [None, "int8"])
def test_awq_chooses_the_same_scales_and_clipping_under_every_cpu_route(monkeypatch, activations):
    """The regression of issue 31: AWQ fed each block the previous quantized block's output
    through the int4 kernels, whose route depends on the call size and the CPU (the int8
    kernel quantizes activations, the dense routes do not), so the scales it chose did
    too. Now every route gives the same quantized model, bit for bit."""
    from awqtensor.ops import cpu_kernel

    if cpu_kernel.unavailable() is not None or not cpu_kernel.binding():
        pytest.skip("needs awqtensor's C++ CPU op")
    data = calibration_ids(n=2, seq_len=64)
    results = {}
    # W4A8's own step (the format's activation quantization) on two routes; weight-only on all
    routes = ROUTES if activations is None else {k: ROUTES[k] for k in ("int8 kernel", "fp32 dense")}
    for route, settings in routes.items():
        old = cpu_kernel.dense_route(**settings)
        with monkeypatch.context() as m:
            if route == "reference":
                m.setenv("AWQTENSOR_DISABLE", "cpu_blocks")
            try:
                model = tiny_llama(4)  # two blocks: the second calibrates on the first's quantized output
                quantize_(model, awq_config(group_size=32, n_samples=2, seq_len=64, n_grid=4,
                                            activations=activations), calibration_data=data)
            finally:
                cpu_kernel.dense_route(**old)
        results[route] = {n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None),
                                                                                        Int4AWQTensor)}
    first = results["int8 kernel"]
    assert len(first) == 14
    for route, weights in results.items():
        for name, w in weights.items():
            ref = first[name]
            for field in ("scales", "zeros", "act_scale"):
                a, b = getattr(w, field), getattr(ref, field)
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (route, name, field)
            assert torch.equal(w.plain_qweight(), ref.plain_qweight()), (route, name)
