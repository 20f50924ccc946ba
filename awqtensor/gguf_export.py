"""``save_gguf``: an awqtensor model as a GGUF file that llama.cpp (and ollama) read as is.

The int4 weights are not re-quantized: each group of ``group_size`` columns is one or more
of llama.cpp's 32-column blocks with the same codes. Asymmetric weights become **Q4_1**
blocks (``w = q * d + m``) with ``d = scale`` and ``m = -zero * scale``; symmetric ones
**Q4_0** (``w = (q - 8) * d``) with ``d = scale``. Only the fp16 rounding of ``d`` and
``m`` moves the weights (about 2^-11 of a step). So ``group_size`` must be a multiple of 32
(or the whole row), and ``in_features`` too.

What llama.cpp cannot hold is refused with what to change: an ``act_scale`` (AWQ's 1/s on a
Linear whose scale no earlier op absorbed: o_proj under grouped-query attention; quantize
with ``awq_config(..., act_scale=False)``), other group sizes, rope scalings other than
linear, and architectures other than Llama/Mistral (GGUF ``llama``), Qwen2 and Qwen3.
Norms are written as F32, embeddings, a float head and float Linears as ``float_type``
(F16 by default). Llama's q/k rows are permuted to llama.cpp's rotary layout (as its own
converter does). The tokenizer is written from a Hugging Face byte-level BPE tokenizer
(``tokenizer.json``): tokens, types, merges, special ids, the chat template, and
llama.cpp's pre-tokenizer name, recognized from the tokenizer's own pre-tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import packing
from .fusion import LinearSlice
from .tensor import Int4AWQTensor

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FLOAT_TYPES = ("f16", "f32")
BLOCK = 32  # columns per Q4_0 / Q4_1 block
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# llama.cpp's pre-tokenizer names, recognized by the Hugging Face pre-tokenizer's shape.
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def save_gguf(model: nn.Module, path, tokenizer, *, float_type: str = "f16", pre: str | None = None,
              overwrite: bool = False) -> Path:
    """Write ``model`` (a transformers causal LM: Llama, Mistral, Qwen2 or Qwen3, its Linears
    int4 from ``quantize_``, or float) and ``tokenizer`` to the GGUF file ``path``.
    ``float_type``: "f16" or "f32" for embeddings, a float head and float Linears.
    ``pre``: llama.cpp's pre-tokenizer name; by default recognized from the tokenizer
    ("smollm", "gpt-2", "qwen2", else "default" with a warning). Written to a unique
    temporary file beside ``path`` and renamed into place: a failure leaves no partial file
    and the previous one intact. An existing ``path`` that is not a GGUF file is refused
    unless ``overwrite``. Returns the path."""
    try:
        import gguf
    except ImportError:
        raise ImportError("save_gguf needs the gguf package: pip install gguf") from None
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {FLOAT_TYPES}, got {float_type!r}")
    config = getattr(model, "config", None)
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise ValueError(f"save_gguf writes {sorted(ARCHS)} models; this one is "
                         f"{getattr(config, 'model_type', type(model).__name__)!r}")
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("save_gguf needs the model's Hugging Face (fast) tokenizer: llama.cpp reads the "
                         "vocabulary from the file (tokenizer=AutoTokenizer.from_pretrained(...))")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; save_gguf writes one file (e.g. {path / 'model.gguf'})")
    if path.is_file() and not overwrite and path.read_bytes()[:4] != b"GGUF":
        raise ValueError(f"{path} exists and is not a GGUF file; choose another name, or pass overwrite=True")
    tensors = list(_tensors(model, arch, float_type))  # every refusal comes before the file exists
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _write_metadata(writer, gguf, model, arch, tensors)
            _write_tokenizer(writer, gguf, tokenizer, config.vocab_size, pre)
            for name, data, kind in tensors:
                writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind.upper()))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _tensors(model, arch, float_type):
    """(GGUF name, numpy data, GGML type name) for every tensor, in llama.cpp's names."""
    config = model.config
    base = model.get_submodule("model")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    yield "token_embd.weight", _float(base.embed_tokens.weight, float_type), float_type
    for i, layer in enumerate(base.layers):
        for hf, name in NORMS.items():
            module = _child(layer, hf)
            if module is not None:
                yield f"blk.{i}.{name}.weight", _float(module.weight, "f32"), "f32"
        for hf, name in LINEARS.items():
            module = _child(layer, hf)
            if module is None:
                raise ValueError(f"model.layers.{i}.{hf} is missing: save_gguf needs Llama's module names")
            weight, bias, rows = _source(module)
            if arch == "llama" and name in ("attn_q", "attn_k"):  # HF's rotate-half rows -> llama.cpp's pairs
                order = _rope_permutation(module.out_features, heads if name == "attn_q" else kv_heads)
                rows = order if rows is None else rows[order]
            data, kind = _linear(weight, rows, float_type, f"model.layers.{i}.{hf}")
            yield f"blk.{i}.{name}.weight", data, kind
            if bias is not None:
                yield f"blk.{i}.{name}.bias", _float(bias if rows is None else bias[rows], "f32"), "f32"
    yield "output_norm.weight", _float(base.norm.weight, "f32"), "f32"
    head = model.get_output_embeddings()
    if head is not None and not _tied(model, head):
        data, kind = _linear(head.weight, None, float_type, "lm_head")
        yield "output.weight", data, kind


def _child(module, dotted):
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


def _tied(model, head) -> bool:
    return head.weight is model.get_input_embeddings().weight  # transformers ties by sharing the Parameter


def _source(module):
    """(weight, bias, rows): a slice of a fused Linear reads its rows of the fused weight and bias."""
    if isinstance(module, LinearSlice):
        fused = module.fused
        start = sum(fused.sizes[:module.index])
        return fused.weight, fused.bias, torch.arange(start, start + fused.sizes[module.index])
    return module.weight, module.bias, None


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor a parameter holds; an 8-bit head or embedding gives its float values."""
    t = t.data if isinstance(t, nn.Parameter) else t
    return t.dequantize() if type(t) is not torch.Tensor and not isinstance(t, Int4AWQTensor) else t


def _float(t: torch.Tensor, float_type: str) -> np.ndarray:
    t = _plain(t)
    if isinstance(t, Int4AWQTensor):
        t = t.dequantize()
    dtype = torch.float16 if float_type == "f16" else torch.float32
    out = t.detach().to("cpu", dtype).contiguous()
    if not torch.isfinite(out).all():
        raise ValueError(f"a {list(out.shape)} float tensor holds inf/nan once written as {float_type}"
                         + ("; values beyond fp16's 65504 need float_type='f32'" if float_type == "f16" else ""))
    return out.numpy()


def _linear(weight, rows, float_type, where):
    """One Linear's weight (``rows`` of it, in that order, if given) as Q4_1/Q4_0 bytes (int4)
    or float."""
    w = _plain(weight)
    if not isinstance(w, Int4AWQTensor):
        return _float(w if rows is None else w.detach()[rows], float_type), float_type
    n, k = w.shape
    if w.act_scale is not None:
        raise ValueError(f"{where}: its int4 weight carries an act_scale (an AWQ scale no earlier op could "
                         f"absorb), which llama.cpp cannot hold; quantize with awq_config(..., act_scale=False)")
    gs = w.group_size
    if k % BLOCK or gs % BLOCK:
        raise ValueError(f"{where}: group_size {gs} with in_features {k} does not map onto llama.cpp's "
                         f"{BLOCK}-column blocks; use group_size 32, 64 or 128 (in_features must be a "
                         f"multiple of {BLOCK})")
    codes = packing.unpack_nibbles(w.plain_qweight().cpu(), w.k_padded)[:, :k]
    scales = w.scales.detach().cpu().float()
    zeros = None if w.zeros is None else w.zeros.detach().cpu().float()
    if rows is not None:
        codes, scales = codes[rows], scales[rows]
        zeros = None if zeros is None else zeros[rows]
    per_group = gs // BLOCK
    d = scales.repeat_interleave(per_group, dim=1)[:, :k // BLOCK]
    if not torch.isfinite(d.half()).all():
        raise ValueError(f"{where}: a scale does not fit in fp16, which llama.cpp's blocks store")
    blocks = codes.reshape(codes.shape[0], k // BLOCK, BLOCK)
    nibbles = blocks[..., :BLOCK // 2] | (blocks[..., BLOCK // 2:] << 4)  # byte j: columns j and j + 16
    parts = [_fp16_bytes(d)]
    if zeros is not None:
        m = -(zeros.repeat_interleave(per_group, dim=1)[:, :k // BLOCK] * d)
        if not torch.isfinite(m.half()).all():
            raise ValueError(f"{where}: a block's minimum (-zero * scale, largest {m.abs().max().item():.4g}) does not "
                             f"fit in fp16 (up to 65504), which llama.cpp's Q4_1 blocks store")
        parts.append(_fp16_bytes(m))
    parts.append(nibbles)
    data = torch.cat(parts, dim=-1).reshape(codes.shape[0], -1).contiguous().numpy()
    return data, "q4_1" if zeros is not None else "q4_0"


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _rope_permutation(n: int, heads: int) -> torch.Tensor:
    """Row order taking Hugging Face's rotary layout (each head's first half pairs with its
    second half) to llama.cpp's (adjacent rows pair)."""
    half = n // heads // 2
    return torch.arange(n).reshape(heads, 2, half).transpose(1, 2).reshape(-1)


def _write_metadata(writer, gguf, model, arch, tensors):
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "awqtensor model").name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise ValueError(f"save_gguf writes default or linear rope; this model's is {kind!r}")
    window = getattr(config, "sliding_window", None)
    if window and config.model_type == "mistral" and window < config.max_position_embeddings:
        warnings.warn("llama.cpp's llama architecture attends over the whole context; this Mistral's "
                      f"sliding window ({window}) is not written: keep prompts within it", stacklevel=3)
    kinds = [k for _, _, k in tensors if k.startswith("q4")]
    file_type = gguf.LlamaFileType.MOSTLY_Q4_1 if kinds.count("q4_1") >= kinds.count("q4_0") and kinds else \
        gguf.LlamaFileType.MOSTLY_Q4_0 if kinds else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer, gguf, tokenizer, vocab_size, pre):
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(spec):
        raise ValueError("save_gguf writes byte-level BPE tokenizers (GPT-2 style, as Llama 3, Qwen and SmolLM "
                         f"use); this one is {model.get('type')!r} without byte-level pre-tokenization")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: token for token, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # rows the model has and the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _pre_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    bos, probe = tokenizer.bos_token_id, tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bos is not None and bool(probe) and probe[0] == bos)
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _pieces(node):
    if not node:
        return []
    return [p for n in node.get("pretokenizers", []) for p in _pieces(n)] if node.get("type") == "Sequence" \
        else [node]


def _byte_level(spec) -> bool:
    return any(p.get("type") == "ByteLevel" for p in _pieces(spec.get("pre_tokenizer")))


def _pre_name(spec) -> str:
    pieces = _pieces(spec.get("pre_tokenizer"))
    shape = [p.get("type") for p in pieces]
    if shape == ["ByteLevel"] and pieces[0].get("use_regex", True):
        return "gpt-2"
    if shape == ["Digits", "ByteLevel"] and pieces[0].get("individual_digits"):
        return "smollm"
    if shape == ["Split", "ByteLevel"] and pieces[0].get("pattern", {}).get("Regex") == QWEN2_REGEX:
        return "qwen2"
    warnings.warn(f"save_gguf: llama.cpp's pre-tokenizer for {shape} is not known here; writing 'default' "
                  f"(text may split differently from Hugging Face's): pass pre= with llama.cpp's name",
                  stacklevel=4)
    return "default"
