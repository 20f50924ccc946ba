"""Fast decoding: a lean greedy/sampling loop around one decode step per token.

``model.generate`` of transformers spends, per token, about as long in Python (logits
processors, stopping criteria, input preparation, output dataclasses) and in
``torch.compile``'s guard checks (one per parameter and cache tensor) as a small
quantized model spends in its matmuls. Here a token costs one call of a step (token in,
next token out, the KV cache updated in place), plus a few tensor ops::

    ids = awqtensor.generate(model, input_ids, max_new_tokens=64)

The step is awqtensor's C++ one (``awqtensor.native``: Llama-family models on the CPU,
nothing to compile) where the model allows it, else a compiled step whose guards skip
the module's parameters. The prompt is prefilled eagerly (any length, no
recompilation); a compiled step is compiled once per model, batch size and cache
length. The cache length is the prompt plus the new tokens rounded up to
``CACHE_STEP``, so calls of similar lengths reuse one graph. Single
tokens attend through ``_decode_attention`` (registered with transformers as
``awqtensor_decode``; prompts still take sdpa), which the compiled step fuses.

``fast_generate_(model)`` makes transformers' own ``model.generate`` take what it can of
this: a static cache, the decode attention and a compiled forward with the same guard
filter, also on the CPU (transformers compiles only on accelerators by default).

Both skip Dynamo's guards on module attributes, and the C++ step holds the tensors it
was built from, so what is kept for a model is keyed on a fingerprint of it (``_fingerprint``:
every module, its forward hooks, and every parameter and buffer's identity, dtype, device,
shape and data), taken once per ``generate`` (or transformers' ``generate``) call: loading
with ``assign=True``, replacing a weight or a module, registering a hook or moving the
model drops what was kept, and the next call builds it again (the compiled step
recompiles). In-place changes (``load_state_dict`` without ``assign``, ``copy_``) keep
it: the step reads the same tensors. ``reset(model)`` drops it by hand.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import types
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import native
from .ops import cpu_kernel, reference

log = logging.getLogger("awqtensor")

CACHE_STEP = 256  # cache lengths are rounded up to a multiple of this (one graph per length)
# What generate and fast_generate_ compile, per model; nothing kept here refers to its model.
_steps: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_forwards: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()
_fingerprints: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # what they were built from


def _compiled(fn, model: nn.Module, mode: bool | str = True, own_inputs: tuple[str, ...] | None = None):
    """``torch.compile(fn)`` with Dynamo's guards on module attributes skipped (about
    3.5 ms of SmolLM2's decode step on our CPU, against 0.45 ms). Without those guards,
    a compiled graph would also match another model of the same code whose parameters
    differ in type or shape, so each model's function gets a code object of its own:
    Dynamo keeps compiled graphs per code object. ``own_inputs``: a function made for one
    model, cache and input shape (generate's step) keeps only the guards on these
    arguments and on the ambient state (grad mode, global torch flags)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{type(model).__name__}_{next(_numbers)}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    options = dict(COMPILE_OPTIONS, **({"cpp_wrapper": True} if mode == "max" else {}))
    if own_inputs is not None:
        options["guard_filter_fn"] = functools.partial(_only_guards_on, ("", *own_inputs))
    return torch.compile(own, fullgraph=True, options=options)


def _only_guards_on(roots: tuple[str, ...], entries) -> list[bool]:
    """Keep the guards whose source starts at one of ``roots`` ("" = the ambient state);
    drop those on the model, the KV cache and module globals (SmolLM2: ~1,500 guards, 0.3 ms
    a step)."""
    return [not e.is_global and e.name.split(".")[0].split("[")[0] in roots for e in entries]


_numbers = itertools.count()
COMPILE_OPTIONS = {
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    # Inductor checks each custom op's output against its fake in Python (assert_size_stride,
    # assert_alignment): 242 calls a SmolLM2 step, 0.7 ms of ~12.5 (A/B in one process).
    # The ops' fakes are opcheck-tested (tests/test_ops.py).
    "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False,
}
COMPILE_MODES = (False, True, "max")  # "max": Inductor's C++ wrapper too (no Python between the kernels)


ATTENTION = "awqtensor_decode"


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention for one new token per row; anything else goes to sdpa. On the
    CPU, awqtensor::decode_attention's C++ kernel: one call a layer that reads only the
    filled part of a static cache (SmolLM2: ~3 us a layer, against ~60 us for two bmm calls
    and a softmax, and ~90 us for torch's CPU flash-attention kernel, mostly setup).
    Elsewhere the same arithmetic in torch ops, which the compiled step fuses."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    special = any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks", "position_bias"))
    if q != 1 or special or dropout or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = d ** -0.5 if scaling is None else scaling
    if query.device.type == "cpu" and _cpu_attention():
        out = torch.ops.awqtensor.decode_attention(query, key, value, attention_mask, scale)
    else:  # torch ops, which the compiled step fuses
        out = reference.decode_attention(query, key, value, attention_mask, scale)
    return out, None


@torch.compiler.assume_constant_result  # decided once, when a step is traced
def _cpu_attention() -> bool:
    """Whether awqtensor::decode_attention has its C++ CPU kernel (built with the int4 one)."""
    return cpu_kernel.unavailable() is None and cpu_kernel.binding()


def use_decode_attention_(model: nn.Module) -> bool:
    """Switch a transformers model from sdpa to ``_decode_attention`` (sdpa for prompts, so
    the same function); False, changing nothing, where the model uses another attention or
    cannot switch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(ATTENTION, _decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks sdpa gets
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, NotImplementedError):  # a model that takes only the built-in attentions
        return False
    return True


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5 renames ``past_key_values`` to ``cache`` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache(model: nn.Module, batch: int, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)  # sized by the first update


def _step_for(model: nn.Module, batch: int, length: int, device: torch.device, keyword: str, compile: bool | str,
              greedy: bool):
    """(step, cache) for this batch size and cache length, built once and reused; the cache
    is passed to the model as ``keyword``. A greedy step returns the next tokens [B, 1] (the
    argmax fused into the compiled step), else the logits [B, V]."""
    kept = _steps.setdefault(model, {})
    if (batch, length, device) not in kept:  # one cache per shape, shared by the steps
        kept[batch, length, device] = _cache(model, batch, length)
    cache = kept[batch, length, device]
    key = (batch, length, device, compile, greedy)
    if key not in kept:
        # The model comes in as an argument, not through the closure: a step kept in
        # ``_steps`` must not hold its key alive (the model could never be freed).
        def step(model: nn.Module, token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
            """``token`` [B, 1] at ``position`` [1] -> next tokens or logits; fills the cache."""
            out = model(input_ids=token, cache_position=position, position_ids=position.expand(token.shape[0], 1),
                        use_cache=True, **{keyword: cache})
            logits = out.logits[:, -1]
            return logits.argmax(-1, keepdim=True) if greedy else logits

        # one step per model, cache and batch (this key): only the token, the position and
        # the closure's constants are checked per call
        kept[key] = _compiled(step, model, compile, own_inputs=("token", "position", "greedy", "keyword")) \
            if compile else step
    return kept[key], cache


def _native_plan(model: nn.Module, cache, batch: int, length: int, device: torch.device):
    """The C++ decode step over ``cache`` (filled by the prompt), built once per cache, or
    None where ``native.unsupported`` gives a reason (logged once)."""
    kept = _steps.setdefault(model, {})
    key = ("native", batch, length, device)
    if key not in kept:
        kept[key] = _try_plan(model, cache, length) if device.type == "cpu" else None
    return kept[key]


def reset(model: nn.Module) -> None:
    """Forget the compiled decode steps (and their caches) kept for ``model``."""
    _steps.pop(model, None)
    _forwards.pop(model, None)
    _fingerprints.pop(model, None)


def _data(t: torch.Tensor) -> tuple:
    """Where a tensor's data lives: its data pointer, or its inner tensors' (a subclass)."""
    if is_traceable_wrapper_subclass(t):
        return tuple(_data(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return (t.data_ptr(),)


def _fingerprint(model: nn.Module) -> tuple:
    """What the steps, caches and plans kept for ``model`` were built from: every module and
    its forward hooks (the global ones too), every parameter and buffer (identity, type,
    dtype, device, shape, data pointers). Ids alone could repeat once a tensor is freed; a
    kept plan holds its tensors alive, so their data pointers cannot. No references to the
    model. SmolLM2-135M (705 entries): about 2 ms, once per generate call."""
    hooks = nn.modules.module
    parts = [tuple(hooks._global_forward_hooks), tuple(hooks._global_forward_pre_hooks)]
    with torch._C.DisableTorchFunctionSubclass():  # a subclass's dtype/shape without its __torch_function__
        for module in model.modules():
            parts.append((id(module), type(module), tuple(module._forward_hooks), tuple(module._forward_pre_hooks)))
            for name, t in itertools.chain(module._parameters.items(), module._buffers.items()):
                parts.append((name, None) if t is None else
                             (name, id(t), type(t), t.dtype, t.device, tuple(t.shape), _data(t)))
    return tuple(parts)


def _forget_if_changed(model: nn.Module) -> None:
    """``reset(model)`` when its fingerprint differs from the one its kept steps were built from."""
    fingerprint = _fingerprint(model)
    if _fingerprints.get(model) != fingerprint:
        if model in _steps or model in _forwards:
            log.debug("%s changed since its decode steps were built: building them again", type(model).__name__)
        reset(model)
        _fingerprints[model] = fingerprint


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, eos_token_id: int | None = None, compile: bool | str = True,
             native: bool = True, generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
    """``input_ids`` [B, T] followed by up to ``max_new_tokens`` new tokens, [B, T + n].

    Greedy by default; ``temperature > 0`` samples (optionally from the ``top_k`` most
    likely). Generation stops early once every row has produced ``eos_token_id`` (rows that
    finished earlier are padded with it). Prompts are unpadded: rows share one length.
    For a causal LM of transformers with a static-cache-capable architecture.

    ``native`` (default): decode with awqtensor's C++ step where the model allows it
    (``awqtensor.native``: Llama/Mistral/Qwen2/Qwen3 in fp32 on the CPU with int4 weights
    in the CPU kernel's layout; ``native.unsupported(model, length)`` says why not); it
    needs no compilation. Otherwise ``compile``: True compiles the decode step (about 20 s
    on 2 cores, more the first time a model is seen: Inductor caches its kernels on
    disk); ``"max"`` also compiles Inductor's wrapper to C++ (SmolLM2 on 2 cores: 11.2
    against 13.0 ms a step, but 3 min to compile the first time, ~30 s after); False runs
    eagerly. ``on_token(tokens [B, 1])`` is called with each new token as it comes (for
    streaming)."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer [batch, tokens] tensor, got {input_ids.dtype} of "
                         f"shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    batch, prompt = input_ids.shape
    limit = getattr(model.config, "max_position_embeddings", None)
    length = -(-(prompt + max_new_tokens) // CACHE_STEP) * CACHE_STEP
    if limit is not None:
        if prompt + max_new_tokens > limit:
            raise ValueError(f"{prompt} prompt + {max_new_tokens} new tokens exceed the model's "
                             f"max_position_embeddings ({limit})")
        length = min(length, limit)
    device = next(model.parameters()).device
    ids = input_ids.to(device=device, dtype=torch.int64)
    if compile:
        use_decode_attention_(model)
    _forget_if_changed(model)
    greedy = temperature == 0.0
    keyword = _cache_keyword(model)
    step, cache = _step_for(model, batch, length, device, keyword, compile, greedy)
    cache.reset()
    positions = torch.arange(prompt, device=device)
    logits = model(input_ids=ids, cache_position=positions, logits_to_keep=1, use_cache=True,
                   **{keyword: cache}).logits[:, -1]
    plan = _native_plan(model, cache, batch, length, device) if native else None
    if plan is not None:  # the C++ step (greedy: with the argmax)
        def step(model, token, position, cache):
            return plan.step(token, int(position), greedy)
    out = [ids]
    done = torch.zeros(batch, 1, dtype=torch.bool, device=device)
    token = _pick(logits, temperature, top_k, generator)
    for i in range(max_new_tokens):
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out.append(token)
        if on_token is not None:
            on_token(token)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        result = step(model, token, positions[-1:] + (i + 1), cache)  # greedy: already the next tokens
        token = result if greedy else _pick(result, temperature, top_k, generator)
    return torch.cat(out, dim=1)


def fast_generate_(model: nn.Module) -> nn.Module:
    """Make ``model.generate`` use a static KV cache and, for its decode steps, the C++ step
    where ``native`` allows it and the step has no padding, else a compiled forward (on
    the CPU too, with the guards ``generate`` skips); returns the model. Prefill stays
    eager (transformers' choice)."""
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    model.generation_config.compile_config = config
    model.generation_config.cache_implementation = "static"
    use_decode_attention_(model)
    model.get_compiled_call = types.MethodType(_compiled_call, model)  # a copy of the model rebinds it
    return model


def _compiled_call(model: nn.Module, compile_config=None):
    """transformers' hook for its compiled forward (``fast_generate_``): the C++ step for
    the decode calls it can serve, else our compiled forward, one per model. Called once per
    ``model.generate`` call."""
    _forget_if_changed(model)
    if model not in _forwards:
        def forward(module: nn.Module, *args, **kwargs):
            return module(*args, **kwargs)

        _forwards[model] = _compiled(forward, model)
    compiled = functools.partial(_forwards[model], model)

    def call(*args, **kwargs):
        out = None if args else _native_forward(model, **kwargs)
        return compiled(*args, **kwargs) if out is None else out
    return call


_PLAIN = {"input_ids", "cache", "past_key_values", "cache_position", "position_ids", "attention_mask", "use_cache",
          "return_dict", "logits_to_keep"}  # what a decode call of transformers' loop passes


def _native_forward(model: nn.Module, input_ids=None, cache_position=None, position_ids=None, attention_mask=None,
                    **kwargs):
    """A decode call of transformers' generate loop through the C++ step, as the model's
    output; None when it cannot serve it (not one token a row from one position, padding,
    other inputs, a cache other than transformers' StaticCache, a full or rolling sliding
    window, or ``native.unsupported``)."""
    from transformers import StaticCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if (set(kwargs) - _PLAIN or type(cache) is not StaticCache or input_ids is None or input_ids.dim() != 2
            or input_ids.shape[1] != 1 or input_ids.device.type != "cpu" or torch.is_grad_enabled()
            or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False
            or not all(getattr(layer, "is_initialized", False) for layer in cache.layers)):
        return None
    first = cache.layers[0]
    position = int(first.cumulative_length)  # where the layers write the new token
    if (cache_position is not None and int(cache_position.reshape(-1)[0]) != position) \
            or position >= first.keys.shape[2] or input_ids.shape[0] != first.keys.shape[0]:
        return None  # another position than the cache's, or a full (sliding: rolling) cache
    if position_ids is not None and not bool((position_ids == position).all()):
        return None  # left padding: rows at different positions
    masks = attention_mask.values() if isinstance(attention_mask, dict) else [attention_mask]  # per layer type
    for mask in masks:  # [B, T] or the prepared [B, 1, 1, L]: every slot up to the new token let through
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor):
            return None  # e.g. flex attention's BlockMask
        seen = mask[:, :position + 1] if mask.dim() == 2 else mask[..., -1, :position + 1]
        if not bool(seen.all() if seen.dtype == torch.bool else (seen == (0 if seen.is_floating_point() else 1)).all()):
            return None
    plans = _steps.setdefault(model, {}).setdefault("transformers", weakref.WeakKeyDictionary())
    tensors = (first.keys.data_ptr(), first.values.data_ptr())
    if cache not in plans or plans[cache][1] != tensors:  # new, or its tensors replaced (reorder_cache, ...)
        plans[cache] = (_try_plan(model, cache, first.max_cache_len), tensors)
    plan = plans[cache][0]
    if plan is None:
        return None
    logits = plan.step(input_ids, position, False)
    for layer in cache.layers:  # the Python count sliding layers keep beside the tensor
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = position + 1
    return CausalLMOutputWithPast(logits=logits.unsqueeze(1), cache=cache)


def _try_plan(model: nn.Module, cache, length: int):
    """native.plan, or None (its reason at debug level)."""
    try:
        return native.plan(model, cache, length)
    except (ValueError, RuntimeError) as why:
        log.debug("%s; compiling a step instead", why)
        return None
