"""save_gguf against readers nobody here wrote: gguf-py's reader and dequantizer (llama.cpp's
own Python package), and llama.cpp itself through llama-cpp-python (skipped if absent)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import awqtensor
from awqtensor import Int4AWQTensor
from awqtensor.gguf_export import _rope_permutation, save_gguf

gguf = pytest.importorskip("gguf")
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki_clean.txt"
SAMPLE = ("The river rises in the hills north of the town and flows south for 42 kilometres, past mills, "
          "farms and two bridges built in 1873 and 1921, before it joins the sea. ") * 8
ARCHS = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 48}}
LINEAR_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer of 320 tokens trained here (as GPT-2, Llama 3, Qwen use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([SAMPLE], trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny(arch: str, seed: int = 0):
    import transformers

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, f"{name}Config")(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **ARCHS[arch])
    torch.manual_seed(seed)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def read(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def dequantized(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).double()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("group_size,zero_point", [(32, True), (64, False), (128, True)])
def test_int4_weights_read_back_through_gguf_py(tmp_path, tokenizer, arch, group_size, zero_point):
    model = tiny(arch)
    awqtensor.quantize_(model, awqtensor.rtn_config(group_size=group_size, zero_point=zero_point))
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer, float_type="f32")
    reader, tensors = read(path)
    kind = "Q4_1" if zero_point else "Q4_0"
    cfg = model.config
    assert reader.fields["general.architecture"].contents() == {"mistral": "llama"}.get(arch, arch)
    assert reader.fields["general.file_type"].contents() == (3 if zero_point else 2)
    assert reader.fields[f"{reader.fields['general.architecture'].contents()}.attention.head_count_kv"].contents() == 2
    for i, layer in enumerate(model.model.layers):
        for hf, name in LINEAR_NAMES.items():
            w = layer.get_submodule(hf).weight
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type.name == kind
            want = w.dequantize().double()
            steps = w.scales.double().repeat_interleave(group_size, 1)[:, :w.shape[1]]
            if arch in ("llama", "mistral") and name in ("attn_q", "attn_k"):
                rows = _rope_permutation(w.shape[0], cfg.num_attention_heads if name == "attn_q"
                                         else cfg.num_key_value_heads)
                want, steps = want[rows], steps[rows]
            got = dequantized(t)
            assert got.shape == want.shape
            # Only fp16's rounding of d and m = -zero * scale separates them: < 5% of one step.
            assert ((got - want).abs() / steps).max() < 0.05
        assert torch.equal(dequantized(tensors[f"blk.{i}.attn_norm.weight"]).float(), layer.input_layernorm.weight)
        if arch == "qwen2":
            assert torch.equal(dequantized(tensors[f"blk.{i}.attn_q.bias"]).float(), layer.self_attn.q_proj.bias)
        if arch == "qwen3":
            assert torch.equal(dequantized(tensors[f"blk.{i}.attn_k_norm.weight"]).float(),
                               layer.self_attn.k_norm.weight)
    assert torch.equal(dequantized(tensors["token_embd.weight"]).float(), model.model.embed_tokens.weight)


def test_fused_model_writes_the_same_file(tmp_path, tokenizer):
    model = tiny("qwen2")
    awqtensor.quantize_(model, awqtensor.rtn_config(group_size=64))
    plain = save_gguf(model, tmp_path / "plain.gguf", tokenizer).read_bytes()
    awqtensor.fuse_(model)
    assert save_gguf(model, tmp_path / "fused.gguf", tokenizer).read_bytes() == plain


def test_8bit_head_is_written_as_its_float_values(tmp_path, tokenizer):
    model = tiny("llama")
    awqtensor.quantize_(model, awqtensor.rtn_config(group_size=32))
    awqtensor.quantize_head_(model)
    _, tensors = read(save_gguf(model, tmp_path / "m.gguf", tokenizer, float_type="f32"))
    assert tensors["output.weight"].tensor_type.name == "F32"
    assert torch.equal(dequantized(tensors["output.weight"]).float(), model.lm_head.weight.dequantize())


def test_tokenizer_metadata(tmp_path, tokenizer):
    model = tiny("llama")
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    reader, _ = read(save_gguf(model, tmp_path / "m.gguf", tokenizer))
    fields = reader.fields
    vocab = tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and all(vocab[tok] == i for i, tok in enumerate(tokens))
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.token_type"].contents()[0] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0


def test_refusals_say_what_to_change_and_leave_no_file(tmp_path, tokenizer):
    model = tiny("llama")
    data = [torch.randint(0, 320, (1, 64)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        awqtensor.quantize_(model, awqtensor.awq_config(group_size=32, n_samples=2, seq_len=64, n_grid=4),
                            calibration_data=data)
    assert model.model.layers[0].self_attn.o_proj.weight.act_scale is not None  # GQA: v -> o cannot fold
    target = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=r"act_scale=False"):
        save_gguf(model, target, tokenizer)
    assert list(tmp_path.iterdir()) == []
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=80, intermediate_size=160, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2))
    awqtensor.quantize_(odd, awqtensor.rtn_config(group_size=32))  # in_features 80: a short last group
    with pytest.raises(ValueError, match="multiple of 32"):
        save_gguf(odd, target, tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        save_gguf(tiny("llama"), target, None)
    with pytest.raises(ValueError, match="float_type"):
        save_gguf(tiny("llama"), target, tokenizer, float_type="q8_0")
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="gpt2"):
        save_gguf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2)), target, tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_act_scale_false_keeps_every_scale_in_the_weights_or_norms():
    data = [torch.randint(0, 320, (1, 64)) for _ in range(2)]
    model = tiny("llama")
    with pytest.raises(ValueError, match="one-call"):
        awqtensor.awq_config(act_scale=False, step="prepare")
    awqtensor.quantize_(model, awqtensor.awq_config(group_size=32, n_samples=2, seq_len=64, n_grid=4,
                                                    act_scale=False), calibration_data=data)
    weights = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), Int4AWQTensor)]
    assert len(weights) == 14 and all(w.act_scale is None for w in weights)


# llama.cpp itself ------------------------------------------------------------------------

def llama_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)  # fp32 KV cache
    llm.eval(list(ids))
    return torch.tensor(np.array(llm.scores[:len(ids)])).double(), llm


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_computes_what_the_model_computes(tmp_path, tokenizer, arch):
    pytest.importorskip("llama_cpp")
    model = tiny(arch)
    ids = tokenizer(SAMPLE)["input_ids"][:64]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Mistral within its window: nothing to warn about
        path = save_gguf(model, tmp_path / "float.gguf", tokenizer, float_type="f32")
    got, llm = llama_logits(path, ids)
    assert llm.tokenize(SAMPLE[:200].encode(), add_bos=False) == tokenizer(SAMPLE[:200])["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double()
    # Float weights: llama.cpp runs fp32 matmuls, so names, q/k row order, norms and rope
    # must all be right for this to hold.
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    awqtensor.quantize_(model, awqtensor.rtn_config(group_size=32))
    got, _ = llama_logits(save_gguf(model, tmp_path / "int4.gguf", tokenizer, float_type="f32"), ids)
    with torch.no_grad():
        int4 = model(torch.tensor([ids])).logits[0].double()
    # Q4_1 x Q8_1: llama.cpp quantizes activations to 8 bits per 32 (measured ~1% here); the
    # int4 weights themselves moved the logits by far more.
    assert (got - int4).abs().max() / int4.abs().max() < 0.03
    assert (got - int4).abs().max() < 0.25 * (want - int4).abs().max()


@pytest.mark.slow
def test_smollm2_in_llama_cpp(tmp_path):
    """The real model: the tokenizer round-trips against the bundled GGUF, and llama.cpp's
    loss on held-aside text matches ours within 1% for an RTN g64 export."""
    pytest.importorskip("llama_cpp")
    from awqtensor import smollm2

    model, tok = smollm2.load()
    awqtensor.quantize_(model, awqtensor.rtn_config(group_size=64))
    path = save_gguf(model, tmp_path / "smollm2.gguf", tok)
    source, _ = read(smollm2.gguf_path())
    ours, tensors = read(path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "llama.rope.freq_base"):
        assert ours.fields[key].contents() == source.fields[key].contents(), key
    assert "output.weight" not in tensors  # tied to token_embd, as in the source
    ids = tok(TEXT.read_text()[:4000])["input_ids"][:256]
    got, _ = llama_logits(path, ids)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double()
    target = torch.tensor(ids[1:])

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[:-1], target).item()

    assert abs(nll(got) / nll(want) - 1) < 0.01
