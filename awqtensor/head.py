"""An 8-bit output head (and tied input embedding) through the int4 kernels.

A small model's output head is its largest matrix: SmolLM2-135M's tied 49152x576
embedding is 113 MB in fp32, read once per decoded token, more than all its int4
Linears together. int4 costs it about +4.6 perplexity; 8 bits per weight, one scale per
row, costs next to nothing (README) and a quarter of fp32's bytes.

No 8-bit kernel is needed: an int8 code w in [-128, 127] is ``16 * hi + lo`` with
``hi = w >> 4`` in [-8, 7] and ``lo = w & 15`` in [0, 15], two int4 codes. So the
[V, H] head is held as one Int4AWQTensor ``halves`` of shape [V, 2H], two groups per
row: the hi codes (scale 16 s, zero point 8) and the lo codes (scale s, zero point 0),
and ``x @ W.T`` is ``[x, x] @ halves.T``, exactly (each row's two dot products are exact
integer sums, and scale 16 s is s times a power of two). That is 1.03 bytes per weight,
through every int4 kernel and its compiled op, on every device.

``quantize_head_(model)`` converts the output head; when the checkpoint ties it to the
input embedding, both modules keep sharing the one (now 8-bit) parameter, and the
embedding lookup dequantizes only the rows it gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor

from . import packing
from .tensor import FLOAT_DTYPES, Int4AWQTensor, _int4_linear_op, _values_checkable, moved_copy

aten = torch.ops.aten
HI_ZERO = 8  # hi codes are stored offset by 8: [-8, 7] -> [0, 15]
_ROW_MAJOR = (packing.PLAIN, packing.CPU_BLOCKS)  # layouts whose qweight rows are output rows


class Int8HeadTensor(TorchAOBaseTensor):
    """A [V, H] weight as int8 codes with one scale per row: ``w ~= q * scale``,
    ``q = clamp(round(w / scale), -128, 127)``, ``scale = max|w_row| / 127``. Held as an
    Int4AWQTensor ``halves`` [V, 2H] (see the module docstring); ``int8()`` gives the codes
    and scales back. Serves ``F.linear`` and ``F.embedding``. Checked where it is made or
    restored (``check_head``), like ``halves`` itself."""

    tensor_data_names = ["halves"]
    tensor_attribute_names = ["shape"]

    def __new__(cls, halves, shape):
        check_head(halves, shape)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=halves.dtype, device=halves.device,
                                                   requires_grad=False)

    def __init__(self, halves, shape):
        super().__init__()
        self.halves = halves

    @classmethod
    def from_int8(cls, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> "Int8HeadTensor":
        """From int8 ``codes`` [V, H] and float ``scales`` [V] (``w = codes * scales``)."""
        if codes.dtype != torch.int8 or codes.dim() != 2 or scales.shape != codes.shape[:1]:
            raise ValueError(f"expected int8 codes [V, H] and scales [V], got {codes.dtype} "
                             f"{tuple(codes.shape)} and {tuple(scales.shape)}")
        if not scales.is_floating_point():
            raise TypeError(f"Int8HeadTensor: scales must be floating, got {scales.dtype}")
        if _values_checkable(scales) and not bool((torch.isfinite(scales) & (scales > 0)).all()):
            bad = scales[~(torch.isfinite(scales) & (scales > 0))]
            raise ValueError(f"Int8HeadTensor: scales must be finite and positive, got {bad.numel()} that are not "
                             f"(e.g. {bad[0].item()})")
        dtype = dtype or scales.dtype
        v, h = codes.shape
        wide = codes.to(torch.int16)
        hi, lo = (wide >> 4) + HI_ZERO, wide & 15  # arithmetic shift: floor(w / 16)
        q = torch.cat((hi, lo), dim=1).to(torch.uint8)
        s = scales.to(torch.float32).unsqueeze(1)
        group_scales = torch.cat((s * 16, s), dim=1).to(dtype)
        zeros = torch.tensor([HI_ZERO, 0], dtype=torch.uint8, device=codes.device).expand(v, 2).contiguous()
        halves = Int4AWQTensor(packing.pack_nibbles(q), group_scales, h, torch.Size((v, 2 * h)), packing.PLAIN,
                               zeros)
        return cls(halves._repacked_for(codes.device, dtype), torch.Size((v, h)))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8HeadTensor":
        if weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"expected a float [V, H] weight, got {weight.dtype} of shape {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError("the head weight holds NaN/Inf values; fix or reload the model before quantizing")
        with torch.no_grad():
            w = weight.detach().float()
            scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
            codes = (w / scales.unsqueeze(1)).round().clamp(-128, 127).to(torch.int8)
        return cls.from_int8(codes, scales, weight.dtype)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [V, H], scales fp32 [V]): the canonical form, as checkpoints store it."""
        h = self.shape[1]
        plain = self.halves.plain_qweight()
        q = packing.codes(plain, 2 * h, packing.PLAIN, 2).to(torch.int16)
        codes = ((q[:, :h] - HI_ZERO) * 16 + q[:, h:]).to(torch.int8)
        return codes, self.halves.scales[:, 1].float()

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight [V, H] (or only ``rows``), in this tensor's dtype."""
        t, h = self.halves, self.shape[1]
        if rows is None:
            wide = t.dequantize()
        elif t.packing_format in _ROW_MAJOR:
            zeros = None if t.zeros is None else t.zeros[rows]
            wide = torch.ops.awqtensor.dequantize(t.qweight[rows], t.scales[rows], zeros, None, t.group_size,
                                                  2 * h, t.packing_format)
        else:  # a layout whose rows are interleaved: dequantize it all (correct, slower)
            wide = t.dequantize()[rows]
        return wide[:, :h] + wide[:, h:]  # both exact multiples of the row's scale: an exact sum

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear(*args, **kwargs)
        if func is F.embedding:
            return _embedding(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)

    def _stable_hash_for_caching(self) -> str:  # what compiled code depends on: never the values
        return "Int8HeadTensor:" + self.halves._stable_hash_for_caching()

    def __repr__(self):
        return (f"Int8HeadTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"packing_format={self.halves.packing_format!r})")


def check_head(halves, shape) -> None:
    """Raise a ValueError/TypeError naming the field unless ``halves`` can hold a [V, H]
    8-bit head (the module docstring): an Int4AWQTensor [V, 2H] of two groups of H per row
    (its own fields, finite scales included, were checked when it was made), without
    act_scale or int8 activations (the head's kernels apply neither)."""
    if not isinstance(halves, Int4AWQTensor):
        raise TypeError(f"Int8HeadTensor: halves must be an Int4AWQTensor, got {type(halves).__name__}")
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2
            and all(isinstance(d, (int, torch.SymInt)) and not isinstance(d, bool) for d in shape)
            and shape[0] >= 0 and shape[1] >= 1):
        raise ValueError(f"Int8HeadTensor: shape must be a 2-D size [V, H >= 1], got {shape!r}")
    v, h = shape
    with torch._C.DisableTorchFunctionSubclass():
        wide = tuple(halves.shape)
    if wide != (v, 2 * h):
        raise ValueError(f"Int8HeadTensor: halves must have shape [V, 2H] = {[v, 2 * h]} for shape {[v, h]}, "
                         f"got {list(wide)}")
    if halves.group_size != h:
        raise ValueError(f"Int8HeadTensor: halves must have group_size H = {h} (hi and lo codes), got "
                         f"{halves.group_size}")
    if halves.act_scale is not None or halves.activations is not None:
        raise ValueError(f"Int8HeadTensor: halves must have no act_scale and activations None, got "
                         f"act_scale {'set' if halves.act_scale is not None else None}, activations "
                         f"{halves.activations!r}")


def _setstate(self, state):
    # torch.load(weights_only=True) restores an Int8HeadTensor here (``halves`` has been
    # restored, and checked, by Int4AWQTensor's own); the wrapper's shape, dtype and device
    # come from the pickle and are checked against it.
    if isinstance(state, tuple) and len(state) == 2 and not state[1]:  # (dict, no slots)
        state = state[0]
    if not isinstance(state, dict) or set(state) != {"halves"}:
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"Int8HeadTensor: a restored state must hold exactly ['halves'], got {got}")
    halves = state["halves"]
    with torch._C.DisableTorchFunctionSubclass():
        shape, dtype, device = self.shape, self.dtype, self.device
    check_head(halves, shape)
    if (dtype, device) != (halves.dtype, halves.device):
        raise ValueError(f"Int8HeadTensor: the restored tensor is {dtype} on {device} but its halves are "
                         f"{halves.dtype} on {halves.device}; expected them to agree")
    self.halves = halves


Int8HeadTensor.__setstate__ = _setstate  # after the class: torchao's __init_subclass__ installs its own
implements = Int8HeadTensor.implements


def _linear(input, weight, bias=None):
    if not isinstance(weight, Int8HeadTensor):
        raise TypeError(f"linear: an Int8HeadTensor must be the weight, got a {type(weight).__name__} weight")
    if input.dtype != weight.dtype:
        raise TypeError(f"linear: input is {input.dtype} but the Int8HeadTensor weight is {weight.dtype}; "
                        f"move the model with model.to({input.dtype})")
    if input.requires_grad and torch.is_grad_enabled():
        return F.linear(input, weight.dequantize(), bias)  # training through a frozen head: exact, slower
    return _int4_linear_op(torch.cat((input, input), dim=-1), weight.halves, bias)


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
               sparse=False):
    if max_norm is not None:
        raise NotImplementedError("an 8-bit embedding cannot renormalize its rows in place (max_norm)")
    if input.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding: token ids must be int64 or int32, got {input.dtype}")
    flat = input.reshape(-1)
    vocab = weight.shape[0]
    if not _values_checkable(flat):
        # traced: no values to read. Indexing would wrap a negative id; as id V instead it fails
        # the compiled gather's bounds check, like any id >= V.
        flat = torch.where(flat < 0, vocab, flat)
    elif flat.numel():  # as F.embedding does: a bad id raises, never wraps
        low, high = (int(t) for t in flat.aminmax())
        if low < 0 or high >= vocab:
            raise IndexError(f"embedding: token id {low if low < 0 else high} is out of range for the 8-bit "
                             f"embedding's vocabulary of {vocab} (ids 0..{vocab - 1})")
    return weight.dequantize(flat).reshape(*input.shape, weight.shape[1])


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    self = args[0]
    return return_and_correct_aliasing(func, args, kwargs, Int8HeadTensor(moved_copy(self.halves, kwargs), self.shape))


def head_modules(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the output head, found as transformers' ``get_output_embeddings``
    or a Linear named ``lm_head``; None when there is none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is head or (head is None and name.rsplit(".", 1)[-1] == "lm_head" and isinstance(module, nn.Linear)):
            return name, module
    return None


def quantize_head_(model: nn.Module) -> nn.Module:
    """Hold the output head's weight (and the input embedding it is tied to, if it is)
    in 8 bits per weight with one scale per row; returns the model. A tie stays a tie:
    both modules keep one shared parameter, and checkpoints store it once."""
    found = head_modules(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings() or a Linear "
                         f"named lm_head) to quantize")
    name, head = found
    weight = head.weight
    if isinstance(weight, Int8HeadTensor):
        return model
    if isinstance(weight, Int4AWQTensor):
        raise TypeError(f"{name} is already int4; quantize_head_ takes a float head (leave lm_head out of "
                        f"quantize_'s selection, as its default filter does)")
    quantized = nn.Parameter(Int8HeadTensor.from_float(weight), requires_grad=False)
    for module in model.modules():  # every module that shares the head's parameter (the tied embedding)
        if getattr(module, "weight", None) is weight:
            module.weight = quantized
    return model


torch.serialization.add_safe_globals([Int8HeadTensor])
