"""The two-step path: ``step="prepare"`` attaches observers, the user runs forwards,
``step="convert"`` searches, folds and quantizes from running statistics alone.

Each observed input keeps only its token count, per-channel sum of |x| and the
per-group second moments ``Σ_g x_g^T x_g`` ([n_groups, group_size, group_size], i.e.
K x group_size numbers): never the activations. Linears that receive the same tensor in
a forward share one statistics object, so they share one scale. The scale search
scores each candidate by the group's Linear-output error computed from those moments
(cross-group terms, which average out, are left out to keep memory at K x group_size);
clipping uses them exactly as the one-call path does.

``awqtensor.quantize_`` (model-level) also discovers each block's mappings on its first
call, so scales fold into norms and earlier Linears as in the one-call path. Through
``torchao.quantization.quantize_`` the handler sees one Linear at a time and cannot
reach the producing norm: the shared scale then stays in each tensor as ``act_scale``.
Clipping there follows AutoAWQ's name rule (skip q/k), having no module loss to ask.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from .. import quant
from ..tensor import Int4AWQTensor
from .blocks import find_blocks
from .mappings import apply_fold, discover, storage_key
from .search import (clip_weight, group_grams, moment_loss, scaled_grams, search_clip, search_scale,
                     weight_profile)

NO_CLIP_NAMES = ("q_", "k_", "query", "key", "Wqkv")  # AutoAWQ's: clipping q/k hurts attention

_live_inputs: dict[tuple, tuple] = {}  # storage key -> (weakref to the input, InputStats)
_paused = [False]  # discovery's own probe forwards must not count


class InputStats:
    """Running statistics of one input tensor shared by ``members``. With ``full``, the
    whole second-moment matrix ``Σ xᵀx`` (K x K, zero-padded to whole groups) is kept
    instead of its diagonal group blocks: a lone Linear's output error is then exact
    from it, with no activations stored."""

    def __init__(self, group_size: int, full: bool = False):
        self.group_size, self.full = group_size, full
        self.members: list[nn.Linear] = []
        self.tokens = 0
        self.abs_sum = None
        self._moments = None  # [Kp, Kp] if full, else [n_groups, gs, gs]; fp64

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        abs_sum = x.abs().sum(0).double()
        if self.full:
            gs = x.shape[1] if self.group_size == -1 else self.group_size
            xp = torch.nn.functional.pad(x, (0, quant.n_groups(x.shape[1], gs) * gs - x.shape[1]))
            moments = (xp.T @ xp).double()
        else:
            moments = group_grams(x, self.group_size).double()
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self._moments = moments if self._moments is None else self._moments + moments
        self.tokens += x.shape[0]

    @property
    def grams(self) -> torch.Tensor | None:
        """Σ_g x_gᵀ x_g per group, [n_groups, gs, gs]."""
        if not self.full or self._moments is None:
            return self._moments
        kp = self._moments.shape[0]
        gs = kp if self.group_size == -1 else self.group_size
        blocks = self._moments.reshape(kp // gs, gs, kp // gs, gs).diagonal(dim1=0, dim2=2)
        return blocks.permute(2, 0, 1)

    @property
    def gram(self) -> torch.Tensor:
        """Σ xᵀx, [Kp, Kp] (``full`` only)."""
        if not self.full:
            raise RuntimeError("InputStats(full=False) keeps only the per-group blocks")
        return self._moments


def _observe(linear: nn.Linear, args) -> None:
    if _paused[0]:
        return
    x = args[0]
    key = storage_key(x)
    entry = _live_inputs.get(key)
    if entry is not None and entry[0]() is not None and storage_key(entry[0]()) == key:
        if linear._awq_stats is None:  # a second reader of an input already counted: share
            linear._awq_stats = entry[1]
            entry[1].members.append(linear)
        return
    if linear._awq_stats is None:
        linear._awq_stats = InputStats(linear._awq_group_size)
        linear._awq_stats.members.append(linear)
    linear._awq_stats.update(x)
    for k in [k for k, (ref, _) in _live_inputs.items() if ref() is None]:
        del _live_inputs[k]
    _live_inputs[key] = (weakref.ref(x), linear._awq_stats)


def observe_linear(linear: nn.Linear, group_size: int) -> None:
    if hasattr(linear, "_awq_observer"):
        raise RuntimeError("this Linear is already prepared for AWQ; run forwards, then convert")
    linear._awq_stats, linear._awq_group_size = None, group_size
    linear._awq_observer = linear.register_forward_pre_hook(_observe)


def _release(linear: nn.Linear) -> None:
    linear._awq_observer.remove()
    for name in ("_awq_observer", "_awq_stats", "_awq_group_size"):
        delattr(linear, name)


def prepare(model: nn.Module, config, selected) -> nn.Module:
    """Attach observers to the ``selected`` Linears and a discovery hook to each block."""
    for _, linear in selected:
        observe_linear(linear, config.group_size)
    ids = {id(m) for _, m in selected}
    _, blocks = find_blocks(model, [m for _, m in selected])
    model._awq_mappings = []
    for block in blocks:
        names = [n for n, m in block.named_modules() if id(m) in ids]
        if not names or block is model:
            continue

        def discover_once(module, args, kwargs, names=names):
            module._awq_discovery.remove()  # first: discover() itself calls the block
            del module._awq_discovery
            _paused[0] = True
            try:
                model._awq_mappings.append((module, discover(module, args, kwargs, names)))
            finally:
                _paused[0] = False

        block._awq_discovery = block.register_forward_pre_hook(discover_once, with_kwargs=True)
    return model


def _group_scale(linears: list[nn.Linear], stats: InputStats, config, where: str, names: list[str]):
    """(s, [scaled and clipped float weights]) for Linears sharing ``stats``; clipping
    skips the Linears whose ``names`` match NO_CLIP_NAMES (unknown names: clipped)."""
    weights = [lin.weight.detach().float() for lin in linears]
    if stats is None or stats.tokens == 0:
        raise RuntimeError(f"{where} saw no input: run forward passes between step='prepare' and 'convert'")
    x_mean = (stats.abs_sum / stats.tokens).float()
    grams = (stats.grams / stats.tokens).float()
    if not (torch.isfinite(x_mean).all() and torch.isfinite(grams).all()):
        warnings.warn(f"{where}: NaN/Inf in the observed activations; using scale 1 and no clipping "
                      f"(plain round-to-nearest)", stacklevel=4)
        return torch.ones_like(x_mean), weights
    gs = config.group_size

    def loss(s):
        return moment_loss(weights, grams, s, gs, config.zero_point)

    s, *_ = search_scale(loss, x_mean, weight_profile(weights, gs), config.n_grid, config.duo_scaling)
    scaled = [w * s for w in weights]
    if config.clip:
        g = scaled_grams(grams, s)
        for i, name in enumerate(names):
            if not any(p in name.rsplit(".", 1)[-1] for p in NO_CLIP_NAMES):
                lo, hi = search_clip(scaled[i], g, gs, config.zero_point, config.max_shrink, config.n_clip_grid)
                scaled[i] = clip_weight(scaled[i], lo, hi, gs, config.zero_point)
    return s, scaled


def _swap(linear: nn.Linear, weight: torch.Tensor, config, act_scale=None, name="weight"):
    dtype = linear.weight.dtype
    scale = None if act_scale is None else act_scale.to(dtype)
    linear.weight = nn.Parameter(Int4AWQTensor.from_float(
        weight.to(dtype), config.group_size, config.zero_point, scale, name=name, activations=config.activations),
        requires_grad=False)


def _convert_unfolded(linear: nn.Linear, config, name: str = "weight") -> None:
    """Per-Linear convert: the group's scale becomes act_scale (computed once per group)."""
    stats = linear._awq_stats
    if stats is None:
        raise RuntimeError(f"{name} saw no input: run forward passes between step='prepare' and 'convert'")
    if not hasattr(stats, "result"):
        names = [getattr(lin, "_awq_name", "") for lin in stats.members]
        s, scaled = _group_scale(stats.members, stats, config, name, names)
        stats.result = {id(lin): w for lin, w in zip(stats.members, scaled)}, s
    weights, s = stats.result
    _swap(linear, weights[id(linear)], config, act_scale=1 / s, name=name)
    _release(linear)


def convert(model: nn.Module, config, selected) -> nn.Module:
    """Search, fold and quantize every observed Linear from its statistics."""
    for name, linear in selected:
        if not hasattr(linear, "_awq_observer"):
            raise RuntimeError(f"{name} was not prepared: call quantize_(model, awq_config(step='prepare')) "
                               f"and run forwards before step='convert'")
        linear._awq_name = name
    folded = []
    for block, mappings in getattr(model, "_awq_mappings", []):
        for mapping in mappings:
            if mapping.fold == "act_scale":
                continue  # converted below, per Linear, like the torchao path
            linears = [block.get_submodule(n) for n in mapping.linears]
            s, scaled = _group_scale(linears, linears[0]._awq_stats, config, linears[0]._awq_name,
                                     [lin._awq_name for lin in linears])
            with torch.no_grad():
                for lin, w in zip(linears, scaled):
                    lin.weight.copy_(w)
            apply_fold(block, mapping, s)  # may rescale rows of an earlier group: swap at the end
            folded += linears
    for lin in folded:
        _swap(lin, lin.weight.detach(), config, name=f"{lin._awq_name}.weight")
        _release(lin)
    for name, linear in selected:
        if hasattr(linear, "_awq_observer"):
            _convert_unfolded(linear, config, name=f"{name}.weight")
        del linear._awq_name
    if hasattr(model, "_awq_mappings"):
        del model._awq_mappings
    return model
