"""Int4AWQTensor: a linear weight stored as packed int4 with group-wise scales."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
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

    Every instance is checked where it is made (``__new__``, which ``from_float``,
    ``_replace``, slicing and moves go through) or restored (``__setstate__``, which
    ``torch.load(weights_only=True)`` calls): ``check_fields`` raises a ValueError/TypeError
    naming the field, so a crafted checkpoint never reaches the kernels. Never per call.
    """

    tensor_data_names = ["qweight", "scales"]
    tensor_attribute_names = ["group_size", "shape", "packing_format"]
    optional_tensor_data_names = ["zeros", "act_scale"]
    optional_tensor_attribute_names = ["activations"]

    def __new__(cls, qweight, scales, group_size, shape, packing_format, zeros=None, act_scale=None,
                activations=None):
        check_fields(qweight, scales, group_size, shape, packing_format, zeros, act_scale, activations)
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
        if isinstance(act_scale, torch.Tensor) and act_scale.dtype in FLOAT_DTYPES + (torch.float64,):
            act_scale = act_scale.to(device=weight.device, dtype=scales.dtype)  # held in the weight's dtype
        plain = cls(qweight, scales, group_size, weight.shape, packing.PLAIN, zeros, act_scale, activations)
        return plain._repacked_for(weight.device, weight.dtype)

    def check(self) -> None:
        """``check_fields`` on this tensor's current fields (``copy_`` runs it on its source)."""
        with torch._C.DisableTorchFunctionSubclass():
            shape = self.shape
        check_fields(self.qweight, self.scales, self.group_size, shape, self.packing_format, self.zeros,
                     self.act_scale, self.activations)

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


# What a pickle's state holds: the declared fields but the shape, which is the wrapper's.
_REQUIRED = tuple(n for n in Int4AWQTensor.tensor_data_names + Int4AWQTensor.tensor_attribute_names if n != "shape")
_OPTIONAL = tuple(Int4AWQTensor.optional_tensor_data_names + Int4AWQTensor.optional_tensor_attribute_names)
_DERIVED = ("_flat", "_in_features")  # recomputed, never trusted from a pickle


def _setstate(self, state):
    # torch.load(weights_only=True) restores an Int4AWQTensor here: the wrapper (shape,
    # dtype, device) comes from the pickle's arguments, the fields from ``state``, and
    # neither is trusted. Replaces the __setstate__ torchao's __init_subclass__ installs,
    # keeping what it does: optional fields that older pickles lack default to None.
    if isinstance(state, tuple) and len(state) == 2 and not state[1]:  # (dict, no slots)
        state = state[0]
    if not isinstance(state, dict):
        raise ValueError(f"Int4AWQTensor: cannot restore from a {type(state).__name__} state; expected a dict "
                         f"of its fields {_REQUIRED + _OPTIONAL}")
    fields = {name: value for name, value in state.items() if name not in _DERIVED}
    unknown = sorted(map(str, set(fields) - set(_REQUIRED + _OPTIONAL)))
    missing = [name for name in _REQUIRED if name not in fields]
    if unknown or missing:
        raise ValueError(f"Int4AWQTensor: a restored state must hold {_REQUIRED} (and optionally {_OPTIONAL}); "
                         f"got unknown {unknown}, missing {missing}")
    fields = {**dict.fromkeys(_OPTIONAL), **fields}
    with torch._C.DisableTorchFunctionSubclass():
        shape, dtype, device = self.shape, self.dtype, self.device
    check_fields(shape=shape, **fields)
    if dtype != fields["scales"].dtype or device != fields["qweight"].device:
        raise ValueError(f"Int4AWQTensor: the restored tensor is {dtype} on {device} but its scales are "
                         f"{fields['scales'].dtype} and its qweight is on {fields['qweight'].device}; expected "
                         f"the scales' dtype and the qweight's device")
    for name, value in fields.items():
        setattr(self, name, value)
    self._in_features = shape[1]  # derived, so never written (__getstate__)


Int4AWQTensor.__setstate__ = _setstate


def _is_int(value) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _tensor(field: str, value, dtypes: tuple, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Int4AWQTensor: {field} must be a tensor ({what}), got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"Int4AWQTensor: {field} must be {what}, got {value.dtype}")
    if value.layout != torch.strided or value.is_nested:  # kernels read raw strided memory
        raise TypeError(f"Int4AWQTensor: {field} must be a dense (strided) tensor, got layout {value.layout}"
                        f"{' (nested)' if value.is_nested else ''}")


def _shaped(field: str, value: torch.Tensor, expected: tuple, why: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"Int4AWQTensor: {field} must have shape {list(expected)} ({why}), got "
                         f"{list(value.shape)}")


def _values_checkable(*tensors) -> bool:
    """Whether values can be read: not while tracing (torch.compile, a dispatch mode such as
    FakeTensorMode) nor of fake or meta tensors, where only shapes exist."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return not any(t is not None and (t.device.type == "meta" or is_fake(t)) for t in tensors)


def check_fields(qweight, scales, group_size, shape, packing_format, zeros=None, act_scale=None,
                 activations=None) -> None:
    """Raise a ValueError/TypeError naming the field (expected against got) unless these
    fields make a valid Int4AWQTensor (the class docstring): the layout's qweight dtype and
    shape, scales [N, ceil(K / group_size)] floating and finite, zero points 0..15,
    act_scale [K] finite in the scales' dtype, one device. Costs one pass over scales,
    zeros and act_scale (values are not read while tracing or of fake/meta tensors)."""
    if packing_format not in packing.PACKINGS:
        raise ValueError(f"Int4AWQTensor: packing_format must be one of {packing.PACKINGS}, got {packing_format!r}")
    w4a8.check_mode("Int4AWQTensor", activations)
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(map(_is_int, shape))
            and shape[0] >= 0 and shape[1] >= 1):
        raise ValueError(f"Int4AWQTensor: shape must be a 2-D size [out_features >= 0, in_features >= 1], "
                         f"got {shape!r}")
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"Int4AWQTensor: group_size must be a positive int, got {group_size!r}")
    n, k = shape
    n_groups = -(-k // group_size)  # so the last group holds at least one real column
    _tensor("scales", scales, FLOAT_DTYPES, f"floating, one of {FLOAT_DTYPES}")
    _shaped("scales", scales, (n, n_groups), f"[N, ceil(K / group_size)] for shape {[n, k]} and group_size "
                                              f"{group_size}")
    if packing_format == packing.TRITON and group_size % 16:
        raise ValueError(f"Int4AWQTensor: packing_format 'triton' needs group_size a multiple of 16, "
                         f"got {group_size}")
    if packing_format == packing.CPU_INT4PACK and packing.cpu_int4pack_group_size(group_size) is None:
        raise ValueError(f"Int4AWQTensor: packing_format 'cpu_int4pack' needs group_size a multiple of 32, "
                         f"got {group_size}")
    expected, dtype = packing.qweight_layout(packing_format, n, n_groups, group_size)
    _tensor("qweight", qweight, (dtype,), f"{dtype} in packing_format {packing_format!r}")
    _shaped("qweight", qweight, expected, f"the {packing_format!r} layout of shape {[n, k]} with group_size "
                                          f"{group_size}")
    if zeros is not None:
        _tensor("zeros", zeros, (torch.uint8,), "torch.uint8 zero points, or None for symmetric")
        _shaped("zeros", zeros, (n, n_groups), "[N, n_groups], like scales")
    if act_scale is not None:
        _tensor("act_scale", act_scale, (scales.dtype,), f"{scales.dtype}, the scales' dtype")
        _shaped("act_scale", act_scale, (k,), "[K], one per input channel")
    devices = {name: t.device for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros),
                                              ("act_scale", act_scale)) if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"Int4AWQTensor: all tensors must be on one device, got "
                         f"{', '.join(f'{name} on {d}' for name, d in devices.items())}")
    if not _values_checkable(qweight, scales, zeros, act_scale):
        return
    for name, t in (("scales", scales), ("act_scale", act_scale)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"Int4AWQTensor: {name} must be finite, got {int((~torch.isfinite(t)).sum())} "
                             f"NaN/Inf values")
    if zeros is not None and zeros.numel() and int(zeros.max()) > 15:
        raise ValueError(f"Int4AWQTensor: zeros must hold zero points 0..15, got a maximum of {int(zeros.max())}")


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
    src.check()  # load_state_dict's source: its fields may have been set after it was made
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
