"""``fuse_``: one int4 GEMM for the Linears that read the same input.

q/k/v (and gate/up) each read the same hidden states; three int4 GEMMs read the input
three times and launch three kernels, where one GEMM over the concatenated weight
[N_q + N_k + N_v, K] does it once. That, more than 4 bits alone, is what makes int4
decoding faster than fp16 (AutoAWQ's ``fuse_layers``).

The model stays an ordinary module tree that ``torch.compile`` can trace: the parent
gains one ``FusedLinear`` (e.g. ``self_attn.qkv_proj``) holding the concatenated
Int4AWQTensor, and ``q_proj``/``k_proj``/``v_proj`` become ``LinearSlice`` modules. The
first slice called with an input runs the fused GEMM and keeps its outputs; the others
called with the same input tensor take their columns from it; the last one drops them.
A slice called on its own input (outside the usual forward) runs the GEMM itself, so
the result is always right.

Fuse after loading and before compiling; ``state_dict`` then holds the fused weights
(``qkv_proj.weight``), so save the unfused model.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .tensor import Int4AWQTensor

log = logging.getLogger("awqtensor")

# (children that read one input, the fused module's name): the names of transformers'
# Llama, Qwen2, Mistral and Gemma; pass groups= for other models.
GROUPS = ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj"))


class FusedLinear(nn.Linear):
    """A Linear whose output is the concatenation of several Linears' outputs."""

    def __init__(self, weight: Int4AWQTensor, bias: torch.Tensor | None, sizes: list[int]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sizes = list(sizes)
        self._input = self._outputs = None
        self._pending = 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x or self._outputs is None:
            self._input, self._pending = x, len(self.sizes)
            self._outputs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        out = self._outputs[index]
        self._pending -= 1
        if self._pending == 0:  # every slice has its columns: hold no activations
            self._input = self._outputs = None
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sizes={self.sizes}"


class LinearSlice(nn.Module):
    """Stands in for one of the fused Linears: its columns of the fused output."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a child: its weights are saved once
        self.index = index
        self.in_features, self.out_features = fused.in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, index={self.index}"


def _why_not(linears: list[nn.Module]) -> str | None:
    """Why these Linears cannot share one Int4AWQTensor GEMM, or None."""
    if not all(type(m) is nn.Linear for m in linears):
        return "not all are nn.Linear"
    weights = [m.weight for m in linears]
    if not all(isinstance(w, Int4AWQTensor) for w in weights):
        return "not all are quantized (quantize_ first)"
    first = weights[0]
    for field in ("group_size", "dtype", "device", "activations"):
        if any(getattr(w, field) != getattr(first, field) for w in weights):
            return f"their {field} differs"
    if any(w.shape[1] != first.shape[1] for w in weights):
        return "their in_features differ"
    for field in ("zeros", "act_scale"):
        if any((getattr(w, field) is None) != (getattr(first, field) is None) for w in weights):
            return f"some have {field} and some do not"
    if first.act_scale is not None and any(not torch.equal(w.act_scale, first.act_scale) for w in weights):
        return "their act_scale differs (they were calibrated as separate groups)"
    return None


def concat_rows(weights: list[Int4AWQTensor]) -> Int4AWQTensor:
    """One Int4AWQTensor whose rows are those of ``weights`` in order (checked by ``_why_not``)."""
    first = weights[0]
    cat = (lambda name: None if getattr(first, name) is None else torch.cat([getattr(w, name) for w in weights]))
    plain = first._replace(
        qweight=torch.cat([w.plain_qweight() for w in weights]), scales=cat("scales"), zeros=cat("zeros"),
        shape=torch.Size((sum(w.shape[0] for w in weights), first.shape[1])), packing_format="plain",
    )
    return plain._repacked_for(first.device, first.dtype)


def fuse_(model: nn.Module, groups=GROUPS) -> nn.Module:
    """Fuse, in place, each parent's Linears that read one input (``groups``: pairs of
    (child names, fused name)); returns the model. Groups that cannot be fused are left
    as they are, with the reason at debug level; a model where nothing fused warns."""
    fused = 0
    for parent_name, parent in list(model.named_modules()):
        for names, fused_name in groups:
            if not all(isinstance(getattr(parent, n, None), nn.Module) for n in names):
                continue
            linears = [getattr(parent, n) for n in names]
            why = f"it already has a {fused_name!r}" if hasattr(parent, fused_name) else _why_not(linears)
            if why is not None:
                log.debug("not fusing %s.%s: %s", parent_name, names, why)
                continue
            biases = None
            if any(m.bias is not None for m in linears):
                biases = torch.cat([m.bias.detach() if m.bias is not None else
                                    torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device)
                                    for m in linears])
            module = FusedLinear(concat_rows([m.weight for m in linears]), biases,
                                 [m.out_features for m in linears])
            setattr(parent, fused_name, module)
            for index, name in enumerate(names):
                setattr(parent, name, LinearSlice(module, index))
            fused += 1
    if fused == 0:
        warnings.warn(f"fuse_ found nothing to fuse in {type(model).__name__}: no parent with quantized "
                      f"{' / '.join('+'.join(n) for n, _ in groups)} of one group size, dtype and act_scale",
                      stacklevel=2)
    log.info("fused %d groups of Linears", fused)
    return model
