"""Discovering, inside a block, which Linears share an input and what produced it.

One probe forward with hooks on every submodule records each module's input and output
tensors. Linears whose inputs are the same tensor (same storage) form a group: they
will share one scale. For each group, candidate producers are tried and the fold is
*verified*: the candidate is rescaled by a random positive ``1/s``, the block is run
again, and the fold is kept only if the group's input came out exactly ``x / s``.
Candidates, in order: the leaf module whose output is the group's input (a Linear, or a
module with a per-channel ``weight`` such as RMSNorm / LayerNorm, tried as ``w / s`` and
as Gemma's ``(1 + w) / s - 1``), then earlier Linears with as many outputs as the group
has inputs, nearest first (v -> o through attention, up -> down through ``act(gate) * up``,
fc1 -> fc2 through ReLU). So no model names are needed, and a fold that would change the
function (through GELU, or v -> o under grouped-query attention) is never made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import first_tensor, map_tensors, without_cache

# How a producer absorbs 1/s. "act_scale": nothing can; the tensor keeps 1/s itself.
FOLDS = ("linear", "norm", "norm_one_plus", "act_scale")


@dataclass(frozen=True)
class Mapping:
    """Linears of one block that read the same input, and how their shared scale is folded.

    linears: their names inside the block, in execution order.
    producer: the module that absorbs ``1/s`` (None with fold "act_scale").
    fold: one of FOLDS.
    loss_module: the smallest module that contains every linear of the group and runs
        once per block call ("" = the block); the scale search compares its output.
    """

    linears: tuple[str, ...]
    producer: str | None
    fold: str
    loss_module: str


def storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


def apply_fold(block: nn.Module, mapping: Mapping, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` (in place) so its consumers read x / s."""
    if mapping.fold == "act_scale":
        return
    producer = block.get_submodule(mapping.producer)
    bias = getattr(producer, "bias", None)
    with torch.no_grad():
        if mapping.fold == "linear":
            producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
        elif mapping.fold == "norm":
            producer.weight.div_(s.to(producer.weight.dtype))
        elif mapping.fold == "norm_one_plus":
            w = (1 + producer.weight.float()) / s - 1
            producer.weight.copy_(w)
        else:
            raise ValueError(f"unknown fold {mapping.fold!r}")
        if bias is not None:
            bias.div_(s.to(bias.dtype))


def _leaves(block: nn.Module):
    return {name: m for name, m in block.named_modules() if name and not list(m.children())}


@torch.no_grad()
def _trace(block: nn.Module, args, kwargs, names: list[str]):
    """Run the block once; return {name: (input, output, calls)} and the call order."""
    records, order, handles = {}, [], []
    for name in names:
        def hook(module, m_args, m_kwargs, out, name=name):
            x = m_args[0] if m_args else m_kwargs.get("hidden_states")
            calls = records.get(name, (None, None, 0))[2] + 1
            records[name] = (x, first_tensor(out), calls)
            order.append(name)
        handles.append(block.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return records, order


@torch.no_grad()
def _fold_preserves_input(block, args, kwargs, mapping: Mapping, x: torch.Tensor) -> bool:
    """Apply the fold with a random positive scale; is the group's input then x / s?"""
    producer = block.get_submodule(mapping.producer)
    saved = {k: v.detach().clone() for k, v in producer.named_parameters(recurse=False)}
    s = torch.empty(x.shape[-1]).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    try:
        apply_fold(block, mapping, s.to(x.device))
        records, _ = _trace(block, args, kwargs, [mapping.linears[0]])
        x_new = records[mapping.linears[0]][0]
        expected = x.float() / s.to(x.device)
        err = (x_new.float() - expected).abs().max() / expected.abs().max().clamp(min=1e-30)
        return bool(err < 1e-4)
    except Exception:
        return False
    finally:
        for k, v in saved.items():
            getattr(producer, k).copy_(v)


def _loss_module(names: tuple[str, ...], records) -> str:
    """Deepest common ancestor of ``names`` that ran exactly once in the probe."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    while common:
        name = ".".join(common)
        if name in records and records[name][2] == 1:
            return name
        common.pop()
    return ""


def _one_sample(args, kwargs):
    """The inputs cut to the first sample (every tensor whose first dimension is the
    batch), so the probe holds one sequence's activations, not a batch's."""
    hidden = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    if hidden is None or hidden.dim() < 2 or hidden.shape[0] == 1:
        return args, kwargs
    batch = hidden.shape[0]
    cut = lambda t: t[:1] if t.dim() >= 1 and t.shape[0] == batch else t  # noqa: E731
    return map_tensors(args, cut), map_tensors(kwargs, cut)


@torch.no_grad()
def discover(block: nn.Module, args, kwargs, linear_names: list[str]) -> list[Mapping]:
    """The block's mappings, in execution order. ``linear_names`` are the Linears (inside
    the block) to quantize; others may still serve as producers."""
    all_names = [name for name, _ in block.named_modules() if name]
    kwargs = without_cache(kwargs)
    try:
        probe_args, probe_kwargs = _one_sample(args, kwargs)
        records, order = _trace(block, probe_args, probe_kwargs, all_names)
        args, kwargs = probe_args, probe_kwargs
    except Exception:  # a block whose inputs do not all batch along dim 0: probe the whole batch
        records, order = _trace(block, args, kwargs, all_names)
    missing = [n for n in linear_names if n not in records]
    if missing:
        raise RuntimeError(f"Linears {missing} did not run in the calibration forward; they cannot be "
                           f"calibrated (exclude them with modules_to_not_convert)")
    run_order = list(dict.fromkeys(order))
    groups: dict[tuple, list[str]] = {}
    for name in sorted(linear_names, key=run_order.index):
        groups.setdefault(storage_key(records[name][0]), []).append(name)

    leaves = _leaves(block)
    producers_by_output = {}
    for name in run_order:
        if name in leaves:
            producers_by_output.setdefault(storage_key(records[name][1]), name)

    mappings = []
    for key, names in groups.items():
        names = tuple(names)
        x = records[names[0]][0]
        in_features = block.get_submodule(names[0]).in_features
        candidates = []
        direct = producers_by_output.get(key)
        if direct is not None:
            module = leaves[direct]
            if isinstance(module, nn.Linear):
                candidates.append((direct, "linear"))
            elif getattr(module, "weight", None) is not None and tuple(module.weight.shape) == (in_features,):
                candidates += [(direct, "norm"), (direct, "norm_one_plus")]
        first = run_order.index(names[0])
        for name in reversed(run_order[:first]):
            module = leaves.get(name)
            if (isinstance(module, nn.Linear) and module.out_features == in_features
                    and (name, "linear") not in candidates):
                candidates.append((name, "linear"))
        loss = _loss_module(names, records)
        chosen = Mapping(names, None, "act_scale", loss)
        for producer, fold in candidates:
            trial = Mapping(names, producer, fold, loss)
            if _fold_preserves_input(block, args, kwargs, trial, x):
                chosen = trial
                break
        mappings.append(chosen)
    return mappings
