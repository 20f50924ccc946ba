"""Mixtures of experts: transformers' fused expert parameters as one Linear per expert.

transformers 5 stores a layer's experts as two 3-D parameters, ``gate_up_proj``
[E, 2I, H] and ``down_proj`` [E, H, I] (``@use_experts_implementation`` modules:
Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, ...). ``experts_to_linears`` replaces such a
module by ``RoutedExperts``: a ModuleList of ``Expert`` modules, each an ordinary
``gate_proj``/``up_proj``/``down_proj`` MLP of nn.Linears, with the same forward
signature ``(hidden_states, top_k_index, top_k_weights)`` and the same function. Every
expert weight is then a Linear weight like any other: ``quantize_`` converts it to an
Int4AWQTensor, calibration sees each expert only on the tokens routed to it, the CPU
and Triton ops serve each routed expert, and checkpoints name each expert's Linears
``...experts.{e}.gate_proj`` as vLLM's and AutoAWQ's per-expert loaders do.

The router stays in float (it is not a Linear of the experts module). Expert layouts
this cannot express exactly (a norm after each expert, interleaved gate/up, ...) are
refused with what was found.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_fused_experts(module: nn.Module) -> bool:
    weight = getattr(module, "down_proj", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 3


class Expert(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``, or without a gate
    ``down_proj(act(up_proj(x)))``."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, gated: bool, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw) if gated else None
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_fn(self.gate_proj(x)) * self.up_proj(x) if self.gate_proj is not None \
            else self.act_fn(self.up_proj(x))
        return self.down_proj(hidden)


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class RoutedExperts(nn.ModuleList):
    """The experts of one MoE layer, one ``Expert`` each; called as transformers calls its
    fused experts module.

    Eager: each expert runs on the tokens routed to it only (experts no token chose are
    skipped). With int4 weights in the ``"triton"`` layout (CUDA, or the interpreter) and
    no gradient to compute, all experts share one grouped launch per projection
    (``awqtensor/ops/triton_moe.py``):
    the experts' tensors are stacked once and each expert's weight becomes a view of the
    stack, so nothing is held twice. Under ``torch.compile`` the token counts would be
    data-dependent shapes, so every expert runs on every token and its output is weighted
    by the routing weight (zero where it was not chosen): the same function, one graph,
    E times the matmuls.
    """

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._dense(hidden_states, top_k_index, top_k_weights)
        stacks = self._stacks()
        if stacks is not None and not (torch.is_grad_enabled() and hidden_states.requires_grad):
            # (the grouped op has no backward: adapters training on top take the per-expert path)
            return self._grouped(hidden_states, top_k_index, top_k_weights, stacks)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def _stacks(self) -> dict | None:
        """{projection: (qweight, scales, zeros, act_scale)} stacked over the experts for the
        grouped kernel, or None when they cannot share a launch (another layout, biases,
        mixed settings). Made once; each expert's weight then views the stack."""
        from .packing import TRITON
        from .tensor import Int4AWQTensor

        if getattr(self[0].down_proj.weight, "packing_format", None) != TRITON:  # the common CPU case, cheaply
            self._stacked = None
            return None
        weights = {p: [getattr(getattr(e, p), "weight", None) for e in self] for p in PROJECTIONS}
        cached = getattr(self, "_stacked", None)
        if cached is not None and all(w.qweight.data_ptr() == q[i].data_ptr() for p, (q, *_) in cached.items()
                                      for i, w in enumerate(weights[p])):
            return cached
        self._stacked = None  # stale (the weights moved or changed): let it go before anything else
        flat = [w for ws in weights.values() for w in ws]
        if not all(isinstance(w, Int4AWQTensor) and w.packing_format == TRITON for w in flat):
            return None
        if any(getattr(e, p).bias is not None for e in self for p in PROJECTIONS):
            return None
        for ws in weights.values():
            if len({(w.group_size, w.dtype, w.device, w.zeros is None, tuple(w.shape)) for w in ws}) != 1:
                return None
        self._stacked = {}
        for p, ws in weights.items():
            stack = lambda field: torch.stack([getattr(w, field) for w in ws])  # noqa: E731
            q, scales, zeros = stack("qweight"), stack("scales"), None if ws[0].zeros is None else stack("zeros")
            act = None
            if any(w.act_scale is not None for w in ws):
                ones = torch.ones(ws[0].shape[1], dtype=ws[0].dtype, device=ws[0].device)
                act = torch.stack([ones if w.act_scale is None else w.act_scale for w in ws])
            for i, (expert, w) in enumerate(zip(self, ws)):
                view = w._replace(qweight=q[i], scales=scales[i], zeros=None if zeros is None else zeros[i])
                getattr(expert, p).weight = nn.Parameter(view, requires_grad=False)
            self._stacked[p] = (q, scales, zeros, act)
        return self._stacked

    def _grouped(self, hidden_states, top_k_index, top_k_weights, stacks):
        from .ops import triton_moe

        linear = torch.ops.awqtensor.int4_grouped_linear.default
        group_size = self[0].down_proj.weight.group_size
        rows, block_experts, pairs = triton_moe.routing(top_k_index, len(self))
        gate = linear(hidden_states, rows, block_experts, *stacks["gate_proj"], group_size)
        up = linear(hidden_states, rows, block_experts, *stacks["up_proj"], group_size)
        used = rows >= 0  # padded positions: zero rows, never gathered below
        positions = torch.where(used, torch.arange(rows.numel(), device=rows.device, dtype=rows.dtype), -1)
        down = linear(self[0].act_fn(gate) * up, positions, block_experts, *stacks["down_proj"], group_size)
        weights = top_k_weights.reshape(-1)[pairs[used]]
        out = torch.zeros_like(hidden_states)
        out.index_add_(0, rows[used].long(), (down[used] * weights[:, None]).to(out.dtype))
        return out

    def _dense(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            weight = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)
            out = out + (expert(hidden_states) * weight).to(out.dtype)
        return out


def _unsupported(module: nn.Module) -> str | None:
    """Why ``module``'s fused experts cannot become RoutedExperts, or None."""
    found = {name: tuple(p.shape) for name, p in module.named_parameters(recurse=False)}
    if getattr(module, "has_post_expert_norm", False):
        return f"it normalises each expert's output (has_post_expert_norm); parameters {found}"
    if getattr(module, "has_gate", True) and not getattr(module, "is_concatenated", True):
        return f"gate and up are interleaved (is_concatenated=False); parameters {found}"
    if getattr(module, "has_gate", True) and "gate_up_proj" not in found:
        return f"no gate_up_proj beside down_proj; parameters {found}"
    if not getattr(module, "has_gate", True) and "up_proj" not in found:
        return f"no up_proj beside down_proj; parameters {found}"
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and gate is not _default_gate():
        return f"it gates with its own {type(module).__name__}._apply_gate; parameters {found}"
    if not isinstance(getattr(module, "act_fn", None), nn.Module) and not callable(getattr(module, "act_fn", None)):
        return f"no act_fn; parameters {found}"
    return None


def _default_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - older transformers have no fused experts
        return None
    return _default_apply_gate


class _Activation(nn.Module):
    """A plain activation function as a module (transformers' ACT2FN entries already are)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def split_experts(module: nn.Module) -> RoutedExperts:
    """A RoutedExperts computing what the fused experts ``module`` computes."""
    why = _unsupported(module)
    if why is not None:
        raise NotImplementedError(f"cannot quantize the experts of {type(module).__name__}: {why}. Leave them "
                                  f"in float with modules_to_not_convert=['experts'] or a filter_fn")
    gated = getattr(module, "has_gate", True)
    transposed = getattr(module, "is_transposed", False)
    has_bias = getattr(module, "has_bias", False)
    up_name = "gate_up_proj" if gated else "up_proj"
    up_all, down_all = getattr(module, up_name).detach(), module.down_proj.detach()
    if transposed:  # stored [E, in, out]
        up_all, down_all = up_all.transpose(1, 2), down_all.transpose(1, 2)
    experts, hidden = up_all.shape[0], up_all.shape[2]
    intermediate = up_all.shape[1] // (2 if gated else 1)
    act = module.act_fn if isinstance(module.act_fn, nn.Module) else _Activation(module.act_fn)
    up_bias = getattr(module, f"{up_name}_bias", None) if has_bias else None
    down_bias = getattr(module, "down_proj_bias", None) if has_bias else None
    routed = RoutedExperts()
    for e in range(experts):
        expert = Expert(hidden, intermediate, act, gated, has_bias, up_all.device, up_all.dtype)
        with torch.no_grad():
            rows = up_all[e]
            if gated:
                expert.gate_proj.weight.copy_(rows[:intermediate])
                expert.up_proj.weight.copy_(rows[intermediate:])
            else:
                expert.up_proj.weight.copy_(rows)
            expert.down_proj.weight.copy_(down_all[e])
            if has_bias:
                if gated:
                    expert.gate_proj.bias.copy_(up_bias[e, :intermediate])
                    expert.up_proj.bias.copy_(up_bias[e, intermediate:])
                else:
                    expert.up_proj.bias.copy_(up_bias[e])
                expert.down_proj.bias.copy_(down_bias[e])
        routed.append(expert)
    return routed


def experts_to_linears(model: nn.Module, wanted=None) -> nn.Module:
    """Replace every fused experts module of ``model`` (in place) by RoutedExperts.
    ``wanted(name)``, if given, says which to replace (the others stay as they are)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedExperts) or not _is_fused_experts(module):
            continue
        if wanted is not None and not wanted(name):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, split_experts(module))
    return model
