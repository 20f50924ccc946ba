"""Finding the repeated blocks of a model and feeding them one at a time.

A block's calibration inputs are kept as the (args, kwargs) each batch called it with,
so attention masks, position embeddings and the like travel with the hidden states.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook once it has what it needs, to skip the rest of a forward."""


def find_blocks(model: nn.Module, linears: list[nn.Module]) -> tuple[str, list[nn.Module]]:
    """The ModuleList of same-type modules that holds the most of ``linears``
    (a decoder's layers). Without one, the whole model is one block, with a warning."""
    wanted = {id(m) for m in linears}
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(b) for b in module}) != 1:
            continue
        count = sum(id(m) in wanted for block in module for m in block.modules())
        if count > best_count:
            best, best_count = (name, list(module)), count
    if best is None:
        warnings.warn(f"found no repeated blocks (an nn.ModuleList of identical layers) in "
                      f"{type(model).__name__}; calibrating the whole model as one block, which holds "
                      f"every Linear's inputs at once", stacklevel=3)
        return "", [model]
    return best


def replay(block: nn.Module, inputs):
    """Call ``block`` on each (args, kwargs) of ``inputs`` without gradients, a hook's
    StopForward ending that call early; yields each batch's index just before its call."""
    with torch.no_grad():
        for index, (args, kwargs) in enumerate(inputs):
            yield index
            try:
                block(*args, **kwargs)
            except StopForward:
                pass


def map_tensors(obj, fn):
    """Apply ``fn`` to every tensor in nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor in a module's output: nested tuples/lists/dicts (ModelOutput is a dict)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors_in(o)]
    return []


def cast_floats(obj, dtype: torch.dtype):
    return map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")  # transformers 5.24 says "cache"


def _is_cache(value) -> bool:
    """A transformers KV cache, whatever the keyword that carries it."""
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def without_cache(kwargs: dict) -> dict:
    """The kwargs with KV caches turned off, so probe forwards leave the user's cache alone."""
    kwargs = {k: (None if k in CACHE_KWARGS or _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def first_tensor(out) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _call_model(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        kwargs = dict(batch)
        params = inspect.signature(model.forward).parameters
        if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs.setdefault("use_cache", False)
        model(**kwargs)
    else:
        model(batch)


@torch.no_grad()
def first_block_inputs(model: nn.Module, first_block: nn.Module, batches) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``first_block`` receives for each batch; the rest of each
    forward is skipped. For the whole-model fallback the batches themselves are the inputs."""
    if first_block is model:
        inputs = [((), dict(b)) if isinstance(b, dict) else ((b,), {}) for b in batches]
        try:
            inspect.signature(model.forward).bind(*inputs[0][0], **inputs[0][1])
        except TypeError as error:
            given = ", ".join(inputs[0][1]) or "one tensor"
            raise TypeError(f"{type(model).__name__}.forward cannot take the calibration batches ({given}): "
                            f"{error}. Pass calibration_data as dicts keyed by its forward's arguments") from None
        return inputs
    device = next(model.parameters()).device
    inputs = []

    def grab(module, args, kwargs):  # a KV cache would grow with every replay of the block
        inputs.append((args, without_cache(kwargs)))
        raise StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _call_model(model, map_tensors(batch, lambda t: t.to(device)))
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(inputs) != len(batches):
        raise RuntimeError(f"the model's forward reached its first block for {len(inputs)} of "
                           f"{len(batches)} calibration batches")
    return inputs


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]], dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """Feed every batch through ``block`` (in ``dtype``) and return the next block's
    inputs: the same kwargs with the hidden states replaced by this block's output."""
    outputs = []
    for args, kwargs in inputs:
        hidden = first_tensor(block(*cast_floats(args, dtype), **cast_floats(kwargs, dtype))).float()
        if args:
            outputs.append(((hidden, *args[1:]), kwargs))
        else:
            outputs.append(((), {**kwargs, "hidden_states": hidden}))
    return outputs
