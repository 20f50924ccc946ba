"""Int4AWQTensor: a linear weight stored as packed int4 with group-wise scales."""

from __future__ import annotations

import hashlib


import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor, fill_defaults

from . import ops  # noqa: F401  (registers torch.ops.awqtensor)
from . import packing, quant
from .ops import w4a8

aten = torch.ops.aten

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Int4AWQTensor(TorchAOBaseTensor):
    """An ``nn.Linear`` weight of logical shape [N, K] (out_features, in_features) held in 4 bits.

    Tensor data:
        qweight (uint8): the int4 codes, [N, ceil(K_padded / 2)] in the canonical
            ``"plain"`` packing (see ``awqtensor.packing``), or a backend layout named by
            ``packing_format``. ``K_padded = n_groups * group_size``.
        scales (the tensor's dtype): [N, n_groups], one scale per (output row, group).
        zeros (uint8, optional): [N, n_groups], zero points 0..15; None means symmetric
            quantization with the implicit zero point 8.
        act_scale (the tensor's dtype, optional): [K], multiplies the input per channel
            before the matmul. AWQ puts 1/s here when no earlier op can absorb it.
        activations (str, optional): None, weight-only (activations stay in float), or
            "int8": W4A8, activations quantized to int8 per row and group for calls
            large enough to gain from it (``awqtensor/ops/w4a8.py``).

    Attributes:
        group_size (int): columns per group; per-channel quantization stores K. When K
            is not a multiple of it, the last group covers only the remaining
            ``K - (n_groups - 1) * group_size`` real columns (its min/max come from those)
            and its padded columns dequantize to 0.
        shape (torch.Size): the logical shape [N, K].
        packing_format (str): layout of ``qweight``: "plain" or a backend's, chosen when
            the weight lands on a device or changes dtype; never changed per call.

    Quantization (AutoAWQ's formula, per output row and group; see ``awqtensor.quant``)::

        scale = (max - min).clamp(min=1e-5) / 15
        zero  = clamp(-round(min / scale), 0, 15)
        q     = clamp(round(w / scale) + zero, 0, 15)
        w    ~= (q - zero) * scale               # symmetric: scale = max|w| / 7, zero = 8

    The logical dtype is ``scales.dtype`` and must match the activations. The weight
    stands for ``dequantize() = (q - zero) * scale * act_scale``. Pickling
    (``torch.save``) always writes the "plain" packing.
    """

    tensor_data_names = ["qweight", "scales"]
    tensor_attribute_names = ["group_size", "shape", "packing_format"]
    optional_tensor_data_names = ["zeros", "act_scale"]
    optional_tensor_attribute_names = ["activations"]

    def __new__(cls, qweight, scales, group_size, shape, packing_format, zeros=None, act_scale=None,
                activations=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=scales.dtype, device=qweight.device, requires_grad=False
        )

    def __init__(self, qweight, scales, group_size, shape, packing_format, zeros=None, act_scale=None,
                 activations=None):
        super().__init__()
        self.qweight = qweight
        self.scales = scales
        self.group_size = group_size
        self.packing_format = packing_format
        self.zeros = zeros
        self.act_scale = act_scale
        self.activations = activations
        # Read per F.linear call; the shape property would cost a __torch_function__ round trip.
        self._in_features = shape[1]

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        group_size: int = 128,
        zero_point: bool = True,
        act_scale: torch.Tensor | None = None,
        name: str = "weight",
        activations: str | None = None,
    ) -> "Int4AWQTensor":
        """Quantize a float [N, K] weight. ``group_size=-1`` means one group per row.
        ``act_scale`` (optional, [K]) is stored as is and multiplies the input.
        ``activations``: None (weight-only) or "int8" (W4A8)."""
        validate_weight(weight, group_size, name)
        w4a8.check_mode(name, activations)
        n, k = weight.shape
        group_size = k if group_size == -1 else group_size
        with torch.no_grad():
            scales, zeros = quant.choose_qparams(weight, group_size, zero_point)
            qweight = packing.pack_nibbles(quant.quantize(weight, scales, zeros, group_size))
        plain = cls(qweight, scales, group_size, weight.shape, packing.PLAIN, zeros, act_scale, activations)
        return plain._repacked_for(weight.device, weight.dtype)

    @property
    def k_padded(self) -> int:
        return self.scales.shape[1] * self.group_size

    def plain_qweight(self) -> torch.Tensor:
        """``qweight`` in the canonical "plain" layout (a no-op when it already is)."""
        return packing.repack(self.qweight, self.k_padded, self.packing_format, packing.PLAIN,
                              self.scales, self.zeros)

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] this tensor stands for, in its dtype."""
        return torch.ops.awqtensor.dequantize(
            self.qweight, self.scales, self.zeros, self.act_scale,
            self.group_size, self.shape[1], self.packing_format,
        )

    def _replace(self, **fields) -> "Int4AWQTensor":
        state = {name: getattr(self, name) for name in self.tensor_data_names + self.tensor_attribute_names
                 + self.optional_tensor_data_names + self.optional_tensor_attribute_names}
        state.update(fields)
        return Int4AWQTensor(**state)

    def _repacked_for(self, device, dtype) -> "Int4AWQTensor":
        """This tensor on ``device`` in ``dtype``, in the packing that device's kernel reads."""
        device = torch.device(device)
        target = packing.choose_packing(device, dtype, self.shape[0], self.group_size)
        if (self.device, self.dtype, self.packing_format) == (device, dtype, target):
            return self
        if self.activations is not None:
            w4a8.warn_unavailable(device, target, self.group_size)
        plain = self.plain_qweight()
        cast = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
        scales, zeros = cast(self.scales), None if self.zeros is None else self.zeros.to(device)
        return self._replace(
            qweight=packing.repack(plain.to(device), self.k_padded, packing.PLAIN, target, scales, zeros),
            scales=scales,
            zeros=zeros,
            act_scale=cast(self.act_scale),
            packing_format=target,
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # F.linear is nearly every call a quantized model makes: straight to its handler,
        # without the generic table lookups (about 1.5 us of a ~5 us SmolLM2 k/v call).
        if func is F.linear:
            return _linear(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)

    def __tensor_flatten__(self):
        # torch.compile's guards call this twice per weight on every call of a compiled
        # model; torchao's generic version costs ~3 us (its shape read is a __torch_function__
        # round trip), 1.6 ms per compiled decode step of SmolLM2. What it returns is fixed at
        # construction (nothing reassigns these attributes), so it is computed once.
        flat = self.__dict__.get("_flat")
        if flat is None:
            flat = self.__dict__["_flat"] = super().__tensor_flatten__()
        return list(flat[0]), dict(flat[1])

    def __getstate__(self):
        # Checkpoints hold the canonical layout, readable on any machine.
        state = dict(self.__dict__)
        state.pop("_flat", None)
        state.pop("_in_features", None)
        state["qweight"] = self.plain_qweight()
        state["packing_format"] = packing.PLAIN
        return state

    def _stable_hash_for_caching(self) -> str:
        # What compiled code depends on: metadata, never the values.
        inner = [(name, None if getattr(self, name) is None else (tuple(getattr(self, name).shape), str(getattr(self, name).dtype)))
                 for name in self.tensor_data_names + self.optional_tensor_data_names]
        key = (type(self).__qualname__, tuple(self.shape), str(self.dtype), self.device.type,
               self.group_size, self.packing_format, self.activations, inner)
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    def __repr__(self):
        kind = "asymmetric" if self.zeros is not None else "symmetric"
        extra = ", act_scale" if self.act_scale is not None else ""
        extra += f", activations={self.activations!r}" if self.activations is not None else ""
        return (f"Int4AWQTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"group_size={self.group_size}, {kind}, packing_format={self.packing_format!r}{extra})")


def _setstate(self, state, _torchao_setstate=Int4AWQTensor.__setstate__):
    # torchao's __init_subclass__ installs its own __setstate__ (it fills optional fields
    # that old pickles lack), so ours wraps it rather than being defined in the class.
    _torchao_setstate(self, state)
    with torch._C.DisableTorchFunctionSubclass():
        self._in_features = self.shape[1]  # derived, so never written (__getstate__)


Int4AWQTensor.__setstate__ = _setstate


def validate_weight(weight: torch.Tensor, group_size: int, name: str = "weight") -> None:
    """Raise a ValueError/TypeError saying what to change if ``weight`` cannot be quantized."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out_features, in_features] weight, got "
                         f"{type(weight).__name__} of shape {tuple(getattr(weight, 'shape', ()))}")
    if isinstance(weight, Int4AWQTensor):
        raise TypeError(f"{name} is already an Int4AWQTensor; quantize the float model instead")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {weight.dtype}; int4 quantization needs one of "
                        f"{FLOAT_DTYPES}: convert the model with .to(torch.float32) first")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"{name}: group_size must be a positive int or -1 (per channel), got {group_size!r}")
    if weight.device.type != "meta" and not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"{name} holds {bad} NaN/Inf values; fix or reload the model before quantizing")


implements = Int4AWQTensor.implements


def _linear(input, weight, bias=None):  # F.linear's parameter names, for keyword calls
    """F.linear with an Int4AWQTensor weight (Int4AWQTensor.__torch_function__)."""
    x = input
    if not isinstance(weight, Int4AWQTensor):
        raise TypeError(f"linear: an Int4AWQTensor must be the weight, not the input or bias "
                        f"(got a {type(weight).__name__} weight)")
    dtype, in_features = weight.scales.dtype, weight._in_features  # plain attributes: no dispatch
    if x.dtype != dtype:
        raise TypeError(f"linear: input is {x.dtype} but the Int4AWQTensor weight is {dtype}; "
                        f"move the model with model.to({x.dtype}) or cast the input")
    if x.shape[-1] != in_features:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight expects {in_features}")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _Int4Linear.apply(x, weight, bias)
    return _int4_linear_op(x, weight, bias)


@implements(aten.linear.default)
def _(func, types, args, kwargs):
    return _linear(*args, **kwargs)


class _Int4Linear(torch.autograd.Function):
    """The int4 linear with gradients for its input and bias (the weight stays frozen), so
    adapters can be trained on top of a quantized model. Taken only when a gradient is
    wanted: the ops themselves carry no autograd kernel, which keeps inference calls cheap.
    The backward multiplies by the dequantized weight (exact, whatever the forward kernel)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return _int4_linear_op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.weight.dequantize().to(grad.dtype)
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def _int4_linear_op(x, weight, bias):
    op = torch.ops.awqtensor.int4_linear if weight.activations is None else torch.ops.awqtensor.w4a8_linear
    return op.default(
        x, weight.qweight, weight.scales, weight.zeros, weight.act_scale, bias,
        weight.group_size, weight.packing_format,
    )


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, moved_copy(args[0], kwargs))


def moved_copy(t: "Int4AWQTensor", kwargs: dict) -> "Int4AWQTensor":
    """``_to_copy``'s result: ``t`` repacked for the device and dtype in ``kwargs``, or
    cloned when neither changes (a copy never shares storage with its source)."""
    dtype = kwargs.get("dtype") or t.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{type(t).__name__} can move to {FLOAT_DTYPES}, not {dtype}")
    moved = t._repacked_for(kwargs.get("device") or t.device, dtype)
    return t._apply_fn_to_data(torch.clone) if moved is t else moved


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    self, src = args[0], args[1]
    if not isinstance(src, Int4AWQTensor):
        raise TypeError(f"cannot copy a {type(src).__name__} into an Int4AWQTensor; load a quantized "
                        f"state dict, or quantize_ the float model instead of loading into a quantized one")
    for field in ("shape", "group_size", "activations"):
        if getattr(self, field) != getattr(src, field):
            raise ValueError(f"copy_: {field} differs: destination {getattr(self, field)}, source {getattr(src, field)}")
    for field in ("zeros", "act_scale"):
        if (getattr(self, field) is None) != (getattr(src, field) is None):
            raise ValueError(f"copy_: the destination {'has' if getattr(self, field) is not None else 'lacks'} "
                             f"{field} and the source does not; prepare the model with the same config "
                             f"(zero_point={self.zeros is not None}) as the checkpoint")
    src = src._repacked_for(self.device, self.dtype)
    for name in self.tensor_data_names + self.optional_tensor_data_names:
        if getattr(self, name) is not None:
            getattr(self, name).copy_(getattr(src, name))
    return self


@implements([aten.add_.Tensor, aten.sub_.Tensor])
def _(func, types, args, kwargs):
    # What merging an adapter (PEFT's merge_and_unload, W += delta) does to a weight:
    # int4 codes cannot absorb a float delta without requantizing the whole weight.
    raise TypeError(f"{func.__name__.split('.')[0]}: an Int4AWQTensor cannot take a float update in place (merging "
                    f"a LoRA adapter into int4 weights would requantize them and lose the adapter's precision); "
                    f"keep the adapter separate (PEFT: use the model unmerged, or model.unload() to drop it), or "
                    f"merge it into the float model and quantize that again")


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    self, dim, start, end, step = fill_defaults(args, 5, [0, None, None, 1])
    if dim != 0 or step != 1:
        raise NotImplementedError("Int4AWQTensor slices along output rows (dim 0, step 1) only; "
                                  f"got dim={dim}, step={step}")
    start, end, _ = slice(start, end).indices(self.shape[0])
    end = max(start, end)
    # Rows of a backend layout need not be contiguous, so slice the canonical one.
    plain = self.plain_qweight()
    rows = slice(start, end)
    sliced = self._replace(
        qweight=plain[rows], scales=self.scales[rows],
        zeros=None if self.zeros is None else self.zeros[rows],
        shape=torch.Size((end - start, self.shape[1])), packing_format=packing.PLAIN,
    )
    if self.packing_format == packing.PLAIN:
        return return_and_correct_aliasing(func, args, kwargs, sliced)
    return sliced._repacked_for(self.device, self.dtype)


torch.serialization.add_safe_globals([Int4AWQTensor])
