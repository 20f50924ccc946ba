"""AWQ on the architectures users bring, random-init from transformers configs: post-LN
encoders and decoders, parallel-residual blocks, encoders calibrated on padded batches,
mixtures of experts, vision-language models."""

import warnings

import pytest
import torch
from torch import nn

from awqtensor import Int4AWQTensor, awq_config, quantize_, rtn_config
from awqtensor.api import conv1d_to_linear, linear_subclasses_to_linear, select_linears
from awqtensor.calibration.awq import _Capture
from awqtensor.calibration.blocks import find_blocks, first_block_inputs
from awqtensor.calibration.data import calibration_batches
from awqtensor.calibration.mappings import apply_fold, discover
from awqtensor.moe import RoutedExperts, experts_to_linears, split_experts
from awqtensor.ops import cpu_kernel
from conftest import max_rel_err
from families import VOCAB, build, tiny_llava, tiny_qwen2_vl

def ids(n, seq_len, seed):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def output(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(batch) if isinstance(batch, torch.Tensor) else model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


RESIDUAL_FAMILIES = ["bert", "opt-post-ln", "gptj", "phi", "falcon"]


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_scaling_without_quantization_preserves_the_model(family):
    """Every mapping discovered on calibration data, given a random scale as calibration
    would (producer folded, or act_scale on the input; Linears times s), leaves the whole
    model's output unchanged on held-aside inputs."""
    model = build(family)
    held = ids(2, 40, seed=5)
    expected = output(model, held)
    config = awq_config(group_size=32)
    selected = select_linears(linear_subclasses_to_linear(conv1d_to_linear(model)), config)
    _, blocks = find_blocks(model, [m for _, m in selected])
    chosen = {id(m) for _, m in selected}
    args, kwargs = first_block_inputs(model, blocks[0], calibration_batches(ids(4, 32, seed=1), 4, 32))[0]
    names = [n for n, m in blocks[0].named_modules() if id(m) in chosen]
    mappings = discover(blocks[0], args, kwargs, names)
    assert {n for m in mappings for n in m.linears} == set(names)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in blocks:
            for mapping in mappings:
                linears = [block.get_submodule(n) for n in mapping.linears]
                s = torch.empty(linears[0].in_features).uniform_(0.25, 4.0, generator=gen)
                for linear in linears:
                    linear.weight.mul_(s)
                if mapping.fold == "act_scale":  # what Int4AWQTensor's act_scale does to the input
                    linears[0].register_forward_pre_hook(lambda _, a, s=s: (a[0] / s, *a[1:]))
                    for other in linears[1:]:
                        other.register_forward_pre_hook(lambda _, a, s=s: (a[0] / s, *a[1:]))
                else:
                    apply_fold(block, mapping, s)
    assert max_rel_err(output(model, held), expected) < 1e-5


def test_post_ln_norm_shared_with_the_residual_is_not_folded():
    """BERT's attention.output.LayerNorm feeds intermediate.dense *and* the residual: the
    fold is refused, the scale stays in the tensor, and the norm is untouched."""
    model = build("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "LayerNorm" in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, awq_config(group_size=32, n_samples=8, seq_len=32), calibration_data=ids(8, 32, seed=1))
    for name, p in model.named_parameters():
        if "LayerNorm" in name:
            assert torch.equal(p, before[name]), name
    assert model.encoder.layer[0].intermediate.dense.weight.act_scale is not None


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_awq_beats_rtn_on_post_ln_and_parallel_blocks(family):
    held = ids(4, 48, seed=9)
    expected = output(build(family), held)
    awq, rtn = build(family), build(family)
    quantize_(awq, awq_config(group_size=32, n_samples=8, seq_len=32), calibration_data=ids(8, 32, seed=1))
    quantize_(rtn, rtn_config(group_size=32))
    awq_error, rtn_error = relative_error(output(awq, held), expected), relative_error(output(rtn, held), expected)
    assert awq_error < rtn_error, (awq_error, rtn_error)


def padded(sequences: list[torch.Tensor], length: int, left: bool = False) -> dict:
    batch = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, seq in enumerate(sequences):
        where = slice(length - len(seq), length) if left else slice(0, len(seq))
        batch[i, where], mask[i, where] = seq, 1
    return {"input_ids": batch, "attention_mask": mask}


def test_padding_heavy_calibration_gives_the_scales_of_unpadded_text():
    """The same texts, once as one unpadded batch each and once in batches of four padded
    to twice the longest: the quantized weights come out the same."""
    gen = torch.Generator().manual_seed(11)
    texts = [torch.randint(1, VOCAB, (int(n),), generator=gen) for n in torch.randint(12, 33, (8,), generator=gen)]
    unpadded = [{"input_ids": t[None], "attention_mask": torch.ones(1, len(t), dtype=torch.long)} for t in texts]
    heavy = [padded(texts[i:i + 4], 64) for i in range(0, 8, 4)]
    assert sum(b["attention_mask"].sum() for b in heavy) < 0.5 * sum(b["attention_mask"].numel() for b in heavy)
    models = []
    # the padded batches (256 rows) would reach the CPU op's dense route, the unpadded texts
    # the int8 kernel: another arithmetic for the quantized blocks' outputs. One kernel here.
    old = cpu_kernel.dense_route(None)
    try:
        for data in (unpadded, heavy):
            model = build("bert")
            quantize_(model, awq_config(group_size=32), calibration_data=data)
            models.append(model)
    finally:
        cpu_kernel.dense_route(**old)
    for (name, a), b in zip(models[0].named_modules(), models[1].modules()):
        if isinstance(a, nn.Linear):
            wa, wb = a.weight, b.weight
            if wa.act_scale is not None:
                assert torch.allclose(wa.act_scale, wb.act_scale, rtol=1e-4), name
            assert torch.allclose(wa.dequantize(), wb.dequantize(), rtol=1e-3, atol=1e-5), name


def test_padded_positions_are_left_out_of_the_statistics():
    """Garbage at padded positions does not reach the captured statistics."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    noisy = x.clone()
    noisy[1, 6:] = 1e4
    from awqtensor.calibration.mappings import Mapping

    mapping = Mapping(("0",), None, "act_scale", "0")
    clean = _Capture(block, mapping, [((x[mask][None],), {})], 32, {0})
    masked = _Capture(block, mapping, [((noisy,), {})], 32, {0}, masks=[mask])
    assert masked.stats.tokens == clean.stats.tokens == 16
    assert torch.allclose(masked.stats.abs_sum, clean.stats.abs_sum)


MOE_FAMILIES = ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3"]


def expert_linears(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(isinstance(p, RoutedExperts) for p in _parents(model, n))]


def _parents(model, name):
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_experts_split_into_linears_keep_the_function(family):
    model = build(family)
    held = ids(2, 24, seed=4)
    expected = output(model, held)
    experts_to_linears(model)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    assert max_rel_err(output(model, held), expected) < 1e-5


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_is_quantized_and_the_router_stays_float(family):
    reference, model = build(family), build(family)
    held = ids(2, 32, seed=6)
    expected = output(reference, held)
    quantize_(model, awq_config(group_size=32, n_samples=8, seq_len=32, min_expert_tokens=8),
              calibration_data=ids(8, 32, seed=1))
    experts = expert_linears(model)
    n_layers_with_experts = sum(isinstance(m, RoutedExperts) for m in model.modules())
    assert n_layers_with_experts and len(experts) == n_layers_with_experts * 4 * 3
    assert all(isinstance(m.weight, Int4AWQTensor) for _, m in experts)
    assert all(m.weight.act_scale is not None for n, m in experts if n.endswith(("gate_proj", "up_proj")))
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    routers = [m for n, m in model.named_modules() if n.endswith((".gate", "_gate"))]
    assert routers and all(not isinstance(p, Int4AWQTensor) for r in routers for p in r.parameters())
    assert relative_error(output(model, held), expected) < 0.3


def test_experts_with_too_few_tokens_fall_back_to_rtn_with_one_warning():
    model, rtn = build("qwen3-moe"), build("qwen3-moe")
    quantize_(rtn, rtn_config(group_size=32))
    with pytest.warns(UserWarning, match="expert Linear groups saw fewer than min_expert_tokens") as record:
        quantize_(model, awq_config(group_size=32, n_samples=2, seq_len=16, min_expert_tokens=10**6),
                  calibration_data=ids(2, 16, seed=1))
    assert sum("min_expert_tokens" in str(w.message) for w in record) == 1
    for (name, a), (_, b) in zip(expert_linears(model), expert_linears(rtn)):
        assert torch.equal(a.weight.dequantize(), b.weight.dequantize()), name


def test_fused_expert_gate_up_keeps_the_output():
    from awqtensor import fuse_

    model = build("qwen3-moe")
    quantize_(model, rtn_config(group_size=32))
    held = ids(1, 12, seed=3)
    expected = output(model, held)
    fuse_(model)
    assert any(n.endswith("experts.2.gate_up_proj") for n, _ in model.named_modules())
    assert torch.equal(output(model, held), expected)


def test_quantized_moe_compiles_in_one_graph():
    model = build("mixtral")
    model.model.layers = model.model.layers[:1]
    quantize_(model, rtn_config(group_size=32))
    held = ids(1, 12, seed=2)
    eager = output(model, held)
    compiled = torch.compile(model, fullgraph=True)
    # Compiled, every expert runs on every token (weighted by 0 where not routed), so the
    # CPU op sees other batch sizes: its int8 activations round a little differently.
    assert max_rel_err(output(compiled, held), eager) < 2e-3


class _NormedExperts(nn.Module):
    """Fused experts with a norm after each expert: not expressible as plain Linears."""

    has_post_expert_norm = True

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 16, 8))
        self.down_proj = nn.Parameter(torch.randn(2, 8, 8))
        self.act_fn = nn.SiLU()


def test_unrecognised_experts_say_what_was_found():
    with pytest.raises(NotImplementedError, match=r"has_post_expert_norm.*down_proj.*modules_to_not_convert"):
        split_experts(_NormedExperts())
    model = nn.Sequential(nn.Linear(8, 8), _NormedExperts())
    quantize_(model, rtn_config(group_size=-1, modules_to_not_convert=["1"]))
    assert isinstance(model[0].weight, Int4AWQTensor) and model[1].down_proj.dim() == 3


def test_moe_keeps_only_experts_compatible_filters():
    model = build("mixtral")
    with pytest.raises(TypeError, match="not an nn.Linear"):
        quantize_(model, rtn_config(group_size=32), filter_fn=lambda m, n: n.endswith("mlp.experts"))


def test_vision_language_model_quantizes_its_language_model_only():
    """Text-only calibration; the vision tower and projector stay float; an image+text
    forward still runs and stays close to the float model's."""
    reference, model = tiny_llava(), tiny_llava()
    quantize_(model, awq_config(group_size=32, n_samples=8, seq_len=32),
              calibration_data=torch.randint(0, VOCAB - 1, (8, 32), generator=torch.Generator().manual_seed(1)))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            quantized = isinstance(module.weight, Int4AWQTensor)
            assert quantized == name.startswith("model.language_model."), name
    image_tokens = torch.full((2, 16), VOCAB - 1)
    text = torch.randint(0, VOCAB - 1, (2, 20), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": torch.cat([image_tokens, text], 1), "pixel_values": torch.randn(2, 3, 32, 32)}
    from conftest import sqnr_db

    rtn = tiny_llava()
    quantize_(rtn, rtn_config(group_size=32))
    expected = output(reference, batch)
    awq_sqnr, rtn_sqnr = sqnr_db(expected, output(model, batch)), sqnr_db(expected, output(rtn, batch))
    assert awq_sqnr > 15 and awq_sqnr > rtn_sqnr - 0.5, (awq_sqnr, rtn_sqnr)
    everything = tiny_llava()
    quantize_(everything, rtn_config(group_size=32), filter_fn=lambda m, n: isinstance(m, nn.Linear))
    assert isinstance(everything.model.multi_modal_projector.linear_1.weight, Int4AWQTensor)


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "deepseek-v3"])
def test_moe_checkpoints_round_trip_with_identical_logits(family, tmp_path):
    from awqtensor import load_autoawq, load_quantized, save_autoawq, save_quantized

    model = build(family)
    quantize_(model, awq_config(group_size=32, n_samples=8, seq_len=32, min_expert_tokens=8),
              calibration_data=ids(8, 32, seed=1))
    held = ids(2, 24, seed=8)
    expected = output(model, held)
    save_quantized(model, tmp_path / "native")
    assert torch.equal(output(load_quantized(tmp_path / "native"), held), expected)
    # AutoAWQ's format holds no act_scale (RTN instead) and stores fp16 scales: the first
    # trip rounds them, every later one is exact.
    rtn = build(family)
    quantize_(rtn, rtn_config(group_size=32))
    save_autoawq(rtn, tmp_path / "autoawq", dtype=torch.float32)
    import safetensors

    with safetensors.safe_open(tmp_path / "autoawq" / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    # The names vLLM's and AutoAWQ's loaders read: Mixtral's own, the others' as transformers'.
    expert = ("model.layers.1.block_sparse_moe.experts.2.w3.qweight" if family == "mixtral"
              else "model.layers.1.mlp.experts.2.up_proj.qweight")
    assert expert in stored and not any(".experts.gate_up_proj" in n for n in stored)
    once = load_autoawq(tmp_path / "autoawq")
    moe_layers = sum(isinstance(m, RoutedExperts) for m in rtn.modules())
    assert sum(".experts.3.down_proj.weight" in n for n, _ in once.named_parameters()) == moe_layers > 0
    loaded = dict(once.named_parameters())
    for name, linear in expert_linears(rtn):
        w, got = linear.weight, loaded[f"{name}.weight"]
        assert torch.equal(got.plain_qweight(), w.plain_qweight()) and torch.equal(got.zeros, w.zeros)
        assert torch.equal(got.scales, w.scales.half().float())
    save_autoawq(once, tmp_path / "again", dtype=torch.float32)
    assert torch.equal(output(load_autoawq(tmp_path / "again"), held), output(once, held))


def test_qwen2_vl_calibrates_on_text_and_leaves_its_vision_tower_float():
    model = tiny_qwen2_vl()
    quantize_(model, awq_config(group_size=32, n_samples=4, seq_len=32),
              calibration_data=torch.randint(0, VOCAB - 3, (4, 32), generator=torch.Generator().manual_seed(1)))
    linears = {n: isinstance(m.weight, Int4AWQTensor) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert any(n.startswith("model.visual.") for n in linears)
    assert all(quantized == n.startswith("model.language_model.") for n, quantized in linears.items())


def test_torchao_quantize_reaches_experts_once_they_are_linears():
    import torchao

    model = experts_to_linears(build("qwen3-moe"))
    torchao.quantization.quantize_(model, rtn_config(group_size=32))
    assert all(isinstance(m.weight, Int4AWQTensor) for _, m in expert_linears(model))


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_model_without_blocks_names_what_its_forward_cannot_take():
    with pytest.warns(UserWarning, match="no repeated blocks"), \
            pytest.raises(TypeError, match=r"_NoBlocks.forward cannot take the calibration batches \(input_ids\)"):
        quantize_(_NoBlocks(), awq_config(group_size=32, seq_len=32, n_samples=4), calibration_data=ids(4, 32, seed=0))
    model = _NoBlocks()
    with pytest.warns(UserWarning, match="no repeated blocks"):
        quantize_(model, awq_config(group_size=32), calibration_data=[{"x": torch.randn(2, 16, 64)}])
    assert isinstance(model.a.weight, Int4AWQTensor)
