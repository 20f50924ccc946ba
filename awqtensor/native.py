"""awqtensor's C++ decode step for Llama-family models on the CPU.

``awqtensor.generate`` decodes a token with one call of ``DecodePlan.step``
(``ops/cpu_step.cpp``): the embedding, every layer (norms, int4 GEMMs, rotary q/k, the
static cache, attention, SiLU MLP) and the head in C++, with no torch.compile and no
Python between the kernels. It serves what it can check here: a transformers Llama,
Mistral, Qwen2 or Qwen3 causal LM in fp32 on the CPU, whose Linears are nn.Linear (or
``fuse_``'s) with Int4AWQTensor weights in the CPU kernel's layout or float weights, an
embedding and head in float or ``quantize_head_``'s 8 bits, no hooks, full attention and
a rotary embedding that depends on the position only. ``unsupported`` gives the reason
for anything else, and generate then compiles its step instead.
``AWQTENSOR_DISABLE=native_step`` turns it off.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .fusion import FusedLinear, LinearSlice
from .head import Int8HeadTensor
from .ops import cpu_kernel
from .packing import CPU_BLOCKS
from .tensor import Int4AWQTensor

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin are a function of the position alone
_NONE = torch.empty(0)


def _disabled() -> bool:
    return "native_step" in os.environ.get("AWQTENSOR_DISABLE", "").split(",")


def _linear_tensors(module: nn.Module, name: str) -> tuple[list[torch.Tensor], int]:
    """(weight, scales, act_scale, bias) with empty tensors for absent ones, and the group size."""
    weight, bias = module.weight, module.bias
    bias = _NONE if bias is None else bias.detach()
    if isinstance(weight, Int4AWQTensor):
        if weight.packing_format != CPU_BLOCKS or weight.dtype != torch.float32:
            raise _Unsupported(f"{name} is {weight.dtype} in the {weight.packing_format!r} layout, not fp32 "
                               f"{CPU_BLOCKS!r}")
        act = _NONE if weight.act_scale is None else weight.act_scale
        return [weight.qweight, weight.scales, act, bias], weight.group_size
    if type(weight) is not nn.Parameter or weight.dtype != torch.float32:
        raise _Unsupported(f"{name}'s weight is a {type(weight).__name__} of {weight.dtype}")
    return [weight.detach(), _NONE, _NONE, bias], 0


class _Unsupported(Exception):
    pass


def _projections(parent: nn.Module, names: tuple[str, ...], where: str) -> list:
    """[(tensors, group size)] for ``names`` in order, the first holding ``fuse_``'s fused
    Linear and the others empty when they are its slices."""
    modules = [getattr(parent, n, None) for n in names]
    if all(isinstance(m, LinearSlice) for m in modules):
        fused = modules[0].fused
        if not (isinstance(fused, FusedLinear) and all(m.fused is fused and m.index == i for i, m in enumerate(modules))
                and len(fused.sizes) == len(names)):
            raise _Unsupported(f"{where}.{'/'.join(names)} are slices of different fused Linears")
        return [_linear_tensors(fused, f"{where}.{names[0]}")] + [([_NONE] * 4, 0)] * (len(names) - 1)
    out = []
    for n, m in zip(names, modules):
        if type(m) is not nn.Linear:
            raise _Unsupported(f"{where}.{n} is a {type(m).__name__}, not an nn.Linear")
        out.append(_linear_tensors(m, f"{where}.{n}"))
    return out


def _norm(module: nn.Module, eps: float, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if weight is None or getattr(module, "variance_epsilon", None) != eps or weight.dtype != torch.float32:
        raise _Unsupported(f"{name} is not an fp32 RMSNorm with the config's eps")
    return weight.detach()


def _checked(model: nn.Module, length: int) -> nn.Module:
    """The decoder stack (``model.model``) once everything the step assumes is checked."""
    if _disabled():
        raise _Unsupported("AWQTENSOR_DISABLE=native_step")
    why = cpu_kernel.unavailable()
    if why is not None or not cpu_kernel.binding():
        raise _Unsupported(why or "the C++ op is not built (AWQTENSOR_CPU_BINDING=ctypes)")
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        raise _Unsupported(f"model_type {kind!r} is not one of {MODEL_TYPES}")
    if getattr(config, "hidden_act", None) != "silu":
        raise _Unsupported(f"hidden_act {getattr(config, 'hidden_act', None)!r} is not 'silu'")
    stack = getattr(model, "model", None)
    if stack is None or not all(hasattr(stack, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise _Unsupported("no model.embed_tokens/layers/norm/rotary_emb")
    rope = getattr(stack.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        raise _Unsupported(f"rope_type {rope!r} depends on the sequence length")
    if any(set(getattr(m, "_forward_hooks", {})) | set(getattr(m, "_forward_pre_hooks", {})) for m in model.modules()):
        raise _Unsupported("a module has forward hooks")
    for p in model.parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise _Unsupported(f"a parameter is {p.dtype} on {p.device}, not fp32 on the CPU")
    for layer in stack.layers:
        window = getattr(layer.self_attn, "sliding_window", None) or (
            getattr(config, "sliding_window", None) if kind == "mistral" else None)
        if window is not None and window < length:
            raise _Unsupported(f"sliding-window attention ({window} tokens) over a {length}-token cache")
    return stack


def _embedding(stack: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    weight = stack.embed_tokens.weight
    if isinstance(weight, Int8HeadTensor):
        halves = weight.halves
        if halves.packing_format != CPU_BLOCKS:
            raise _Unsupported(f"the 8-bit embedding is in the {halves.packing_format!r} layout")
        return halves.qweight, halves.scales, halves.group_size
    if type(stack.embed_tokens) is not nn.Embedding or type(weight) is not nn.Parameter:
        raise _Unsupported(f"the embedding is a {type(stack.embed_tokens).__name__} of {type(weight).__name__}")
    return weight.detach(), _NONE, 0


def _head(model: nn.Module) -> tuple[list[torch.Tensor], int, bool]:
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        raise _Unsupported("no nn.Linear lm_head")
    if isinstance(head.weight, Int8HeadTensor):
        halves = head.weight.halves
        if halves.packing_format != CPU_BLOCKS:
            raise _Unsupported(f"the 8-bit head is in the {halves.packing_format!r} layout")
        bias = _NONE if head.bias is None else head.bias.detach()
        return [halves.qweight, halves.scales, _NONE, bias], halves.group_size, True
    tensors, group_size = _linear_tensors(head, "lm_head")
    return tensors, group_size, False


def unsupported(model: nn.Module, length: int) -> str | None:
    """Why ``model`` cannot decode through the C++ step with a ``length``-token cache, or None."""
    try:
        _parts(model, length)
    except _Unsupported as why:
        return str(why)
    return None


def _parts(model: nn.Module, length: int) -> tuple:
    """What a plan is made of, once everything is checked: (stack, (embedding, its scales,
    group size), (head tensors, group size, doubled), (linears, group sizes, norms))."""
    stack = _checked(model, length)
    embedding, head = _embedding(stack), _head(model)
    linears, sizes, norms = _layers(model, stack)
    norms.append(_norm(stack.norm, model.config.rms_norm_eps, "model.norm"))
    return stack, embedding, head, (linears, sizes, norms)


def _shapes(attn: nn.Module, mlp: nn.Module, config, where: str) -> int:
    """Check the projections' shapes against the heads (the C++ step indexes by them); the MLP width."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(attn, "head_dim", None)
    if not isinstance(d, int) or d % 2 or heads % kv_heads:
        raise _Unsupported(f"{where}: head size {d!r} or heads {heads}/{kv_heads}")
    width = getattr(getattr(mlp, "gate_proj", None), "out_features", None)
    want = {"self_attn.q_proj": (hidden, heads * d), "self_attn.k_proj": (hidden, kv_heads * d),
            "self_attn.v_proj": (hidden, kv_heads * d), "self_attn.o_proj": (heads * d, hidden),
            "mlp.gate_proj": (hidden, width), "mlp.up_proj": (hidden, width), "mlp.down_proj": (width, hidden)}
    for name, shape in want.items():
        parent, child = name.split(".")
        m = getattr(attn if parent == "self_attn" else mlp, child, None)
        if (getattr(m, "in_features", None), getattr(m, "out_features", None)) != shape:
            raise _Unsupported(f"{where}.{name} is not {shape[0]} -> {shape[1]}")
    return width


def _layers(model: nn.Module, stack: nn.Module) -> tuple[list, list, list]:
    eps = model.config.rms_norm_eps
    linears, sizes, norms, widths = [], [], [], set()
    if len(stack.layers) != model.config.num_hidden_layers:
        raise _Unsupported(f"{len(stack.layers)} layers for a config of {model.config.num_hidden_layers}")
    for i, layer in enumerate(stack.layers):
        where = f"model.layers.{i}"
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise _Unsupported(f"{where} has no self_attn/mlp")
        widths.add(_shapes(attn, mlp, model.config, where))
        if len(widths) > 1:
            raise _Unsupported("layers of different MLP widths")
        parts = _projections(attn, ("q_proj", "k_proj", "v_proj"), f"{where}.self_attn")
        parts += _projections(attn, ("o_proj",), f"{where}.self_attn")
        parts += _projections(mlp, ("gate_proj", "up_proj"), f"{where}.mlp")
        parts += _projections(mlp, ("down_proj",), f"{where}.mlp")
        for tensors, group_size in parts:
            linears += tensors
            sizes.append(group_size)
        qk = [_norm(getattr(attn, n), eps, f"{where}.self_attn.{n}") if hasattr(attn, n) else _NONE
              for n in ("q_norm", "k_norm")]
        norms += [_norm(layer.input_layernorm, eps, f"{where}.input_layernorm"),
                  _norm(layer.post_attention_layernorm, eps, f"{where}.post_attention_layernorm"), *qk]
    return linears, sizes, norms


@torch.no_grad()
def plan(model: nn.Module, cache, length: int):
    """A ``torch.classes.awqtensor.DecodePlan`` over ``model`` and the (filled) static
    ``cache``, or raises ValueError with ``unsupported``'s reason. It holds the model's
    tensors and reads them in place: after any is replaced, a hook added or the model
    moved, build a new one (``generate`` does: it keys its plans on
    ``generation._fingerprint``)."""
    try:
        stack, (embed, embed_scales, embed_group), (head, head_group, doubled), (linears, sizes, norms) = \
            _parts(model, length)
    except _Unsupported as why:
        raise ValueError(f"no C++ decode step for this model: {why}") from None
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    layers = cache.layers
    if len(layers) != len(stack.layers) or not all(getattr(c, "is_initialized", False) for c in layers):
        raise ValueError("the static cache is not filled yet: prefill the prompt first")
    if any(type(c) not in (StaticLayer, StaticSlidingWindowLayer) for c in layers):
        raise ValueError(f"the cache's layers are {type(layers[0]).__name__}, not transformers' static ones")
    tensors = [t for c in layers for t in (c.keys, c.values, c.cumulative_length)]
    attn = stack.layers[0].self_attn
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    cos, sin = stack.rotary_emb(torch.empty(1, dtype=torch.float32), torch.arange(length).unsqueeze(0))
    return torch.classes.awqtensor.DecodePlan(
        linears + head, sizes + [head_group], norms, tensors, embed, embed_scales, cos[0].contiguous(),
        sin[0].contiguous(), [heads, kv_heads, attn.head_dim, embed_group, int(doubled)],
        float(model.config.rms_norm_eps), float(attn.scaling))
