"""AWQ on the architectures users bring, random-init from transformers configs: post-LN
encoders and decoders, parallel-residual blocks, encoders calibrated on padded batches,
mixtures of experts, vision-language models."""

import warnings

import pytest
import torch
import transformers
from torch import nn

from awqtensor import Int4AWQTensor, awq_config, quantize_, rtn_config
from awqtensor.api import conv1d_to_linear, select_linears
from awqtensor.calibration.awq import _Capture
from awqtensor.calibration.blocks import find_blocks, first_block_inputs
from awqtensor.calibration.data import calibration_batches
from awqtensor.calibration.mappings import apply_fold, discover
from awqtensor.moe import RoutedExperts, experts_to_linears, split_experts
from conftest import max_rel_err

VOCAB = 320


def build(family: str, seed: int = 0) -> nn.Module:
    """A small random-init model of ``family``."""
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128)
    llama_like = dict(base, hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    if family == "bert":
        cfg = transformers.BertConfig(**base, hidden_size=96, intermediate_size=192, num_attention_heads=4)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()
    if family == "opt-post-ln":
        cfg = transformers.OPTConfig(**base, hidden_size=96, ffn_dim=192, num_attention_heads=4,
                                     word_embed_proj_dim=96, do_layer_norm_before=False)
        return transformers.OPTForCausalLM(cfg).eval()
    if family == "gptj":
        cfg = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=96, n_layer=2, n_head=4, n_positions=128,
                                      rotary_dim=8, bos_token_id=0, eos_token_id=0)
        return transformers.GPTJForCausalLM(cfg).eval()
    if family == "phi":
        cfg = transformers.PhiConfig(**base, hidden_size=96, intermediate_size=192, num_attention_heads=4,
                                     partial_rotary_factor=0.5)
        return transformers.PhiForCausalLM(cfg).eval()
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**llama_like, intermediate_size=64, num_local_experts=4,
                                         num_experts_per_tok=2)
    elif family == "qwen2-moe":
        cfg = transformers.Qwen2MoeConfig(**llama_like, intermediate_size=128, moe_intermediate_size=64,
                                          shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2)
    elif family == "qwen3-moe":
        cfg = transformers.Qwen3MoeConfig(**llama_like, intermediate_size=128, moe_intermediate_size=64,
                                          num_experts=4, num_experts_per_tok=2, head_dim=24)
    elif family == "deepseek-v3":
        cfg = transformers.DeepseekV3Config(**dict(llama_like, num_key_value_heads=4), intermediate_size=128,
                                            moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
                                            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                            q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                                            qk_nope_head_dim=16, v_head_dim=24)
    else:
        raise ValueError(family)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def ids(n, seq_len, seed):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def output(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(batch) if isinstance(batch, torch.Tensor) else model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


RESIDUAL_FAMILIES = ["bert", "opt-post-ln", "gptj", "phi"]


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_scaling_without_quantization_preserves_the_model(family):
    """Every mapping discovered on calibration data, given a random scale as calibration
    would (producer folded, or act_scale on the input; Linears times s), leaves the whole
    model's output unchanged on held-aside inputs."""
    model = build(family)
    held = ids(2, 40, seed=5)
    expected = output(model, held)
    config = awq_config(group_size=32)
    selected = select_linears(conv1d_to_linear(model), config)
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
    for data in (unpadded, heavy):
        model = build("bert")
        quantize_(model, awq_config(group_size=32), calibration_data=data)
        models.append(model)
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
