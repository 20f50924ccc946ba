"""Discovering, inside a block, which Linears share an input and what produced it.

One probe forward with hooks on every submodule records each module's input and output
tensors. Linears whose inputs are the same tensor (same storage) form a group: they
will share one scale. For each group, candidate producers are tried and the fold is
*verified on the whole block*: the candidate is rescaled by a random positive ``1/s``,
the group's Linears are compensated (``W * s``), the block is run again, and the fold
is kept only if the group's input came out exactly ``x / s`` **and every output the
block returns is unchanged** (to fp32 rounding). The second condition is what refuses a
norm whose output also feeds the residual stream (post-LN encoders and decoders: BERT,
OPT-350m) or another consumer outside the group: folding there would rescale the
residual too.
Candidates, in order: the leaf module whose output is the group's input (a Linear, or a
module with a per-channel ``weight`` such as RMSNorm / LayerNorm, tried as ``w / s`` and
as Gemma's ``(1 + w) / s - 1``), then the few nearest earlier Linears with as many
outputs as the group has inputs (v -> o through attention, up -> down through
``act(gate) * up``, fc1 -> fc2 through ReLU). So no model names are needed, and a fold
that would change the function (through GELU, v -> o under grouped-query attention, a
norm shared with the residual) is never made: the group keeps ``act_scale = 1/s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..moe import RoutedExperts
from .blocks import first_tensor, map_tensors, tensors_in, without_cache

# How a producer absorbs 1/s. "act_scale": nothing can; the tensor keeps 1/s itself.
FOLDS = ("linear", "norm", "norm_one_plus", "act_scale")
# A fold is accepted when the block's outputs move by less than this, relative to their
# largest magnitude: fp32 rounding through a block is ~1e-6; a rescaled residual is ~1e-1.
FOLD_TOLERANCE = 1e-4
MAX_LINEAR_CANDIDATES = 3  # earlier Linears tried as producers, nearest first


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
    reason: str = field(default="", compare=False)
    expert: str = field(default="", compare=False)  # a routed expert's group: that expert's path

    def within(self, path: str) -> "Mapping":
        """This mapping with names relative to the submodule at ``path``."""
        def cut(name):
            return "" if name == path else name[len(path) + 1:] if name and name.startswith(path + ".") else name

        return Mapping(tuple(cut(n) for n in self.linears), self.producer and cut(self.producer), self.fold,
                       cut(self.loss_module), self.reason)

    def describe(self) -> str:
        group = "{" + ", ".join(self.linears) + "}"
        if self.fold == "act_scale":
            return f"{group}: keeps act_scale ({self.reason or 'no producer found'})"
        return f"{group}: folded into {self.producer} ({self.fold})"


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
    """Run the block once; return {name: (input, output, calls)}, the call order and
    every tensor the block returned."""
    records, order, handles = {}, [], []
    for name in names:
        def hook(module, m_args, m_kwargs, out, name=name):
            x = m_args[0] if m_args else m_kwargs.get("hidden_states")
            calls = records.get(name, (None, None, 0))[2] + 1
            records[name] = (x, first_tensor(out), calls)
            order.append(name)
        handles.append(block.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        out = block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return records, order, tensors_in(out)


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    old = old.float()
    return ((new.float() - old).abs().max() / old.abs().max().clamp(min=1e-30)).item()


@torch.no_grad()
def _check_fold(block, args, kwargs, mapping: Mapping, x: torch.Tensor, reference: list[torch.Tensor]):
    """Fold a random positive scale into the producer and compensate the group's Linears
    (W * s), as calibration will; None if the group's input became x / s and the block's
    outputs did not move, else why not."""
    producer = block.get_submodule(mapping.producer)
    linears = [block.get_submodule(n) for n in mapping.linears]
    saved = [(p, p.detach().clone()) for p in producer.parameters(recurse=False)]
    saved += [(lin.weight, lin.weight.detach().clone()) for lin in linears]
    s = torch.empty(x.shape[-1]).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0)).to(x.device)
    try:
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))
        apply_fold(block, mapping, s)
        records, _, outputs = _trace(block, args, kwargs, [mapping.linears[0]])
        change = _relative_change(records[mapping.linears[0]][0], x.float() / s)
        if not change < FOLD_TOLERANCE:
            return f"{mapping.producer} ({mapping.fold}) does not scale the group's input"
        if len(outputs) != len(reference):
            return f"{mapping.producer} ({mapping.fold}) changes what the block returns"
        change = max((_relative_change(new, old) for new, old in zip(outputs, reference)), default=0.0)
        if not change < FOLD_TOLERANCE:
            return f"{mapping.producer} ({mapping.fold}) also changes the block's output (by {change:.2g} relative)"
        return None
    except Exception as error:  # noqa: BLE001  (a fold that breaks the forward is simply not a fold)
        return f"{mapping.producer} ({mapping.fold}) breaks the forward: {type(error).__name__}"
    finally:
        for param, value in saved:
            param.copy_(value)


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


def _expert_mappings(experts: RoutedExperts, prefix: str, linear_names: list[str]) -> list[Mapping]:
    """Each routed expert's mappings, discovered once on one expert (they are alike) with
    a random input, since a probe batch need not reach every expert. The expert is the
    block there, so its gate/up share a scale that nothing folds (their input is a
    gather of the routed tokens: act_scale), and down folds into up through
    ``act(gate) * up``, checked as any fold is."""
    mappings, templates = [], {}
    for e, expert in enumerate(experts):
        path = f"{prefix}.{e}"
        names = tuple(n[len(path) + 1:] for n in linear_names if n.startswith(path + "."))
        if not names:
            continue
        if names not in templates:
            weight = expert.get_submodule(names[0]).weight
            x = torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
            templates[names] = discover(expert, (x,), {}, list(names))
        join = lambda n: f"{path}.{n}" if n else path  # noqa: E731
        mappings += [Mapping(tuple(join(n) for n in m.linears), m.producer and join(m.producer), m.fold,
                             join(m.loss_module), m.reason, expert=path) for m in templates[names]]
    return mappings


@torch.no_grad()
def discover(block: nn.Module, args, kwargs, linear_names: list[str]) -> list[Mapping]:
    """The block's mappings, in execution order. ``linear_names`` are the Linears (inside
    the block) to quantize; others may still serve as producers. The Linears of routed
    experts (``RoutedExperts``) get per-expert mappings, placed where the experts run."""
    all_names = [name for name, _ in block.named_modules() if name]
    routed = {name: m for name, m in block.named_modules() if isinstance(m, RoutedExperts)}
    in_experts = lambda n: any(n.startswith(r + ".") for r in routed)  # noqa: E731
    expert_linears = [n for n in linear_names if in_experts(n)]
    linear_names = [n for n in linear_names if not in_experts(n)]
    kwargs = without_cache(kwargs)
    try:
        probe_args, probe_kwargs = _one_sample(args, kwargs)
        records, order, reference = _trace(block, probe_args, probe_kwargs, all_names)
        args, kwargs = probe_args, probe_kwargs
    except Exception:  # a block whose inputs do not all batch along dim 0: probe the whole batch
        records, order, reference = _trace(block, args, kwargs, all_names)
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
    for prefix, experts in routed.items():
        if prefix in records:
            position = run_order.index(prefix)
            mappings += [(position, m) for m in _expert_mappings(experts, prefix, expert_linears)]
        elif any(n.startswith(prefix + ".") for n in expert_linears):
            raise RuntimeError(f"the experts {prefix} did not run in the calibration forward; they cannot be "
                               f"calibrated (exclude them with modules_to_not_convert)")
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
        first, earlier = run_order.index(names[0]), []
        for name in reversed(run_order[:first]):
            module = leaves.get(name)
            if (isinstance(module, nn.Linear) and module.out_features == in_features
                    and (name, "linear") not in candidates and len(earlier) < MAX_LINEAR_CANDIDATES):
                earlier.append((name, "linear"))
        loss = _loss_module(names, records)
        chosen, refusals = None, []
        for producer, fold in candidates + earlier:
            trial = Mapping(names, producer, fold, loss)
            refusal = _check_fold(block, args, kwargs, trial, x, reference)
            if refusal is None:
                chosen = trial
                break
            refusals.append(refusal)
        if chosen is None:
            why = "; ".join(refusals) if refusals else "no module produces its input inside the block"
            chosen = Mapping(names, None, "act_scale", loss, reason=why)
        mappings.append((first, chosen))
    return [m for _, m in sorted(mappings, key=lambda pair: pair[0])]
