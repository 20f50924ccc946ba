"""Error-feedback rounding (GPTQ), alone and on AWQ's scales, in the unchanged int4 format."""

import warnings

import pytest
import torch

from awqtensor import Int4AWQTensor, awq_config, gptq_config, load_autoawq, quantize_, rtn_config, save_autoawq
from awqtensor import quant
from awqtensor.calibration import gptq
from awqtensor.calibration.awq import _input_moments
from conftest import tiny_llama


def correlated_inputs(tokens: int, k: int) -> torch.Tensor:
    """Inputs whose channels are correlated and unevenly scaled, as a Linear's are."""
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    return (torch.randn(tokens, k) @ mix) * (torch.rand(k) * 3 + 0.1)


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("k,group_size", [(96, 32), (100, 32), (256, 64)])  # 100: a short last group
def test_gptq_lowers_the_output_error_with_the_same_scales_and_zeros(zero_point, k, group_size):
    w, x = torch.randn(48, k), correlated_inputs(512, k)
    scales, zeros = quant.choose_qparams(w, group_size, zero_point)
    codes = gptq.gptq_codes(w, x.T @ x, scales, zeros, group_size)
    assert codes.dtype == torch.uint8 and codes.shape == (48, quant.n_groups(k, group_size) * group_size)
    assert int(codes.max()) <= 15
    rtn = quant.dequantize(quant.quantize(w, scales, zeros, group_size), scales, zeros, group_size, k)
    ours = quant.dequantize(codes, scales, zeros, group_size, k)
    padded = codes[:, k:]  # a short last group's padding holds the zero point, as quant.quantize writes it
    assert torch.equal(padded, quant.quantize(w, scales, zeros, group_size)[:, k:])
    x64 = x.double()
    err_rtn = (x64 @ (w - rtn).double().T).pow(2).sum()
    err_gptq = (x64 @ (w - ours).double().T).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn, (err_gptq / err_rtn).item()


def test_uncorrelated_equal_inputs_leave_nothing_to_compensate():
    """With H a multiple of the identity there is no error to carry: GPTQ rounds to nearest."""
    w = torch.randn(32, 96)
    scales, zeros = quant.choose_qparams(w, 32, True)
    codes = gptq.gptq_codes(w, 7.0 * torch.eye(96), scales, zeros, 32)
    assert torch.equal(codes, quant.quantize(w, scales, zeros, 32))


def test_unseen_inputs_and_a_singular_matrix():
    w = torch.randn(16, 64)
    scales, zeros = quant.choose_qparams(w, 32, True)
    x = correlated_inputs(200, 64)
    x[:, 5] = 0  # an input never active: its column is rounded to nearest, the rest compensated
    codes = gptq.gptq_codes(w, x.T @ x, scales, zeros, 32)
    assert codes is not None and torch.equal(codes[:, 5], quant.quantize(w, scales, zeros, 32)[:, 5])
    rank_one = torch.ones(64, 1) @ torch.ones(1, 64)  # positive semi-definite: dampening makes it definite
    assert gptq.gptq_codes(w, rank_one, scales, zeros, 32) is not None


def test_padded_positions_are_left_out_of_the_second_moments():
    model = tiny_llama(0)
    block = model.model.layers[0]
    hidden = torch.randn(2, 10, 96)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    position_ids = torch.arange(10).expand(2, 10)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position_ids), "attention_mask": None}
    linears = [("mlp.down_proj", block.mlp.down_proj), ("self_attn.q_proj", block.self_attn.q_proj)]
    seen = []
    hook = block.self_attn.q_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    sums = _input_moments(block, linears, [((hidden,), kwargs)], [mask])
    hook.remove()
    rows = seen[0][mask]
    assert torch.allclose(sums["self_attn.q_proj"], rows.T @ rows, rtol=1e-5, atol=1e-4)
    assert set(sums) == {"mlp.down_proj", "self_attn.q_proj"}


def held_aside_error(config, seed, calibration):
    torch.manual_seed(seed)
    reference, model = tiny_llama(seed, num_hidden_layers=3), tiny_llama(seed, num_hidden_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, calibration_data=calibration)
    ids = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        return (model(ids).logits - reference(ids).logits).pow(2).mean().item(), model


def test_on_a_model_gptq_beats_rtn_and_awq_with_gptq_beats_awq():
    calibration = [torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    options = dict(group_size=32, n_samples=8, seq_len=64)
    errors = {name: [held_aside_error(config, seed, calibration)[0] for seed in (1, 2)] for name, config in {
        "rtn": rtn_config(group_size=32), "gptq": gptq_config(**options),
        "awq": awq_config(n_grid=6, **options), "awq+gptq": awq_config(n_grid=6, rounding="gptq", **options)}.items()}
    mean = {name: sum(v) / len(v) for name, v in errors.items()}
    assert mean["gptq"] < mean["rtn"], mean
    assert mean["awq+gptq"] < mean["awq"], mean  # (against GPTQ alone: the SmolLM2 protocol, benchmarks/)


def test_the_hybrid_writes_the_same_format(tmp_path):
    calibration = [torch.randint(0, 320, (1, 64)) for _ in range(4)]
    _, model = held_aside_error(awq_config(group_size=32, n_samples=4, seq_len=64, n_grid=4, rounding="gptq",
                                           act_scale=False), 3, calibration)
    w = model.model.layers[1].mlp.down_proj.weight
    assert isinstance(w, Int4AWQTensor) and w.zeros is not None and w.act_scale is None
    save_autoawq(model, tmp_path, dtype=torch.float32)
    loaded = load_autoawq(tmp_path, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), Int4AWQTensor):
            ours, theirs = module.weight, loaded.get_submodule(name).weight
            assert torch.equal(ours.plain_qweight(), theirs.plain_qweight()), name  # codes bit for bit
            assert torch.equal(ours.zeros, theirs.zeros), name
            assert torch.equal(ours.scales.half().float(), theirs.scales), name  # AutoAWQ stores fp16 scales


def test_a_linear_no_token_reaches_is_rounded_to_nearest_with_a_warning():
    from awqtensor.calibration.awq import _gptq_weight

    w = torch.randn(16, 64)
    with pytest.warns(UserWarning, match="layers.0.mlp.up_proj: no calibration token reached it"):
        t = _gptq_weight(w, torch.zeros(64, 64), None, gptq_config(group_size=32), "layers.0.mlp.up_proj")
    assert torch.equal(t.dequantize(), Int4AWQTensor.from_float(w, 32).dequantize())


@pytest.mark.parametrize("make,match", [
    (lambda: awq_config(rounding="stochastic"), "rounding must be one of"),
    (lambda: awq_config(rounding="gptq", step="prepare"), "needs one-call calibration"),
    (lambda: awq_config(damp=0), "damp must be in"),
    (lambda: gptq_config(clip=True), r"gptq_config sets \['clip'\] itself"),
])
def test_bad_options_say_what_to_change(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_gptq_refuses_a_torchao_base_config():
    from torchao.quantization import Int8WeightOnlyConfig

    with pytest.raises(ValueError, match="rounding='gptq' writes awqtensor's int4 codes"):
        awq_config(rounding="gptq", base_config=Int8WeightOnlyConfig())
