"""``quantize_``: select Linears, validate them all, then swap their weights.

The same per-module handlers serve ``torchao.quantization.quantize_`` and torchao's
``FqnToConfig``; there torchao's ``filter_fn`` decides which modules are converted.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torchao.quantization.transform_module import register_quantize_module_handler
from tqdm.auto import tqdm

from . import calibration
from .calibration import observe
from .config import AWQConfig, RTNConfig, _Int4WeightConfig
from .memory import file_backed, release_file_pages
from .moe import experts_to_linears
from .tensor import Int4AWQTensor, validate_weight

FilterFn = Callable[[nn.Module, str], bool]


ROUTER_NAMES = ("gate", "router")  # a mixture of experts' router stays in float


def default_filter(module: nn.Module, name: str) -> bool:
    """Every nn.Linear except the output head and MoE routers (``gate``, ``router``,
    ``*_gate`` such as Qwen2-MoE's ``shared_expert_gate``)."""
    last = name.rsplit(".", 1)[-1]
    return (isinstance(module, nn.Linear) and last != "lm_head" and last not in ROUTER_NAMES
            and not last.endswith("_gate"))


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace transformers' ``Conv1D`` (GPT-2's transposed Linear) by an equivalent
    nn.Linear, in place, so its weight can be quantized like any other."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
            continue
        linear = nn.Linear(module.weight.shape[0], module.nf, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


LANGUAGE_MODEL_NAMES = ("language_model",)  # transformers' vision-language models (LLaVA, Qwen2-VL, ...)


def language_model_prefix(model: nn.Module) -> str | None:
    """The qualified name of a vision-language model's language model, or None."""
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in LANGUAGE_MODEL_NAMES:
            return name
    return None


@torch.no_grad()
def _computes_linear(module: nn.Linear) -> bool:
    """Whether an nn.Linear subclass's own forward computes F.linear (checked on a random
    input, e.g. Falcon's ``input @ self.weight.T + bias``)."""
    weight = module.weight
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).to(weight)
    try:
        out = module(x)
    except Exception:  # noqa: BLE001  (a forward that needs more than one tensor is not a Linear's)
        return False
    expected = torch.nn.functional.linear(x, weight, module.bias)
    return (isinstance(out, torch.Tensor) and out.shape == expected.shape
            and torch.allclose(out.float(), expected.float(), rtol=1e-3, atol=1e-5))


def linear_subclasses_to_linear(model: nn.Module) -> nn.Module:
    """Replace, in place, each nn.Linear subclass whose own forward is a plain linear map
    (verified) by an nn.Linear holding the same parameters, so that its weight's
    F.linear handler serves it: an Int4AWQTensor has no ``.T`` to matmul by."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear or not isinstance(module, nn.Linear) or not name:
            continue
        if type(module).forward is nn.Linear.forward or not _computes_linear(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight, linear.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def select_linears(model: nn.Module, config: _Int4WeightConfig, filter_fn: Optional[FilterFn] = None):
    """[(name, module)] to quantize; raises if the filter picks something that is not a Linear.
    Without ``filter_fn``, a vision-language model has only its language model's Linears
    selected: the vision tower and the projector stay in float."""
    within = None if filter_fn is not None else language_model_prefix(model)
    filter_fn = filter_fn or default_filter
    selected = []
    for name, module in model.named_modules():
        if within is not None and not name.startswith(within + "."):
            continue
        if not filter_fn(module, name):
            continue
        if any(skip in name for skip in config.modules_to_not_convert):
            continue
        if not isinstance(module, nn.Linear):
            params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
            held = (f"; an Int4AWQTensor holds 2-D Linear weights, not its 3-D parameters {params} "
                    f"(transformers' fused MoE experts are split into one Linear per expert first: "
                    f"select those)" if params else "")
            raise TypeError(f"filter_fn selected {name or '<root>'} ({type(module).__name__}), which is not "
                            f"an nn.Linear; make the filter return True for Linear modules only{held}")
        selected.append((name, module))
    return selected


def quantize_(
    model: nn.Module,
    config: _Int4WeightConfig,
    *,
    calibration_data=None,
    tokenizer=None,
    filter_fn: Optional[FilterFn] = None,
) -> nn.Module:
    """Quantize ``model``'s Linear weights in place to Int4AWQTensor and return the model.

    GPT-2-style ``Conv1D`` layers and nn.Linear subclasses whose forward is a plain linear
    map (Falcon's) are first turned into equivalent nn.Linear modules, and
    transformers' fused MoE experts (3-D parameters) into one Linear per expert
    (``awqtensor.moe``), unless ``modules_to_not_convert`` names them.
    Selection: ``filter_fn(module, name)`` if given, else every nn.Linear but ``lm_head``
    and MoE routers;
    names in ``config.modules_to_not_convert`` are always left alone. Every selected
    module is validated before any is converted, so a failure leaves the model unchanged.

    ``awq_config()`` calibrates on ``calibration_data``: token ids ([n, T] tensor or a list
    of 1-D ones), strings or a text file's ``Path`` with ``tokenizer=``, or model-input
    dicts (see ``awqtensor.calibration``). ``awq_config(step="prepare")`` instead attaches
    observers for the user's own forward passes, and ``step="convert"`` finishes.
    """
    if not isinstance(config, (RTNConfig, AWQConfig)):
        raise TypeError(f"quantize_ takes rtn_config(...) or awq_config(...), got {type(config).__name__}; "
                        f"for torchao's own configs call torchao.quantization.quantize_")
    skip = config.modules_to_not_convert
    linear_subclasses_to_linear(conv1d_to_linear(model))
    experts_to_linears(model, wanted=lambda name: not any(s in name for s in skip))
    selected = select_linears(model, config, filter_fn)
    if not selected:
        raise ValueError(f"quantize_ found no nn.Linear to quantize in {type(model).__name__} "
                         f"(filter_fn={filter_fn}, modules_to_not_convert={config.modules_to_not_convert})")
    for name, module in selected:
        validate_weight(module.weight, config.group_size, name=f"{name}.weight")
    if isinstance(config, AWQConfig):
        if config.step is not None and calibration_data is not None:
            raise ValueError(f"step={config.step!r} takes no calibration_data: run your own forwards "
                             f"between step='prepare' and step='convert', or use step=None")
        if config.step == "prepare":
            return observe.prepare(model, config, selected)
        if config.step == "convert":
            return observe.convert(model, config, selected)
        return calibration.calibrate(model, config, selected, calibration_data, tokenizer)
    mapped = {t.data_ptr(): t for t in file_backed(m.weight for _, m in selected)}
    for name, module in tqdm(selected, desc="quantizing", unit="linear", disable=None, leave=False):
        old = mapped.pop(module.weight.data_ptr(), None)
        _swap_weight(module, config)
        if old is not None:  # the float weight's mmapped pages, once it is replaced
            release_file_pages([old])
    return model


def _swap_weight(module: nn.Linear, config: _Int4WeightConfig, act_scale: torch.Tensor | None = None) -> nn.Linear:
    weight = Int4AWQTensor.from_float(module.weight.detach(), config.group_size, config.zero_point, act_scale,
                                      activations=config.activations)
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


@register_quantize_module_handler(RTNConfig)
def _rtn_handler(module: nn.Module, config: RTNConfig, **_) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"rtn_config applies to nn.Linear, got {type(module).__name__}")
    validate_weight(module.weight, config.group_size)
    return _swap_weight(module, config)


@register_quantize_module_handler(AWQConfig)
def _awq_handler(module: nn.Module, config: AWQConfig, **_) -> nn.Module:
    """torchao's per-module path: prepare / convert only (one-call AWQ needs the whole
    model: use awqtensor.quantize_). Scales are shared by Linears that read the same
    input and kept in the tensors as act_scale (see awqtensor.calibration.observe)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"awq_config applies to nn.Linear, got {type(module).__name__}")
    if config.step == "prepare":
        validate_weight(module.weight, config.group_size)
        observe.observe_linear(module, config.group_size)
    elif config.step == "convert":
        if not hasattr(module, "_awq_observer"):
            raise RuntimeError("this Linear was not prepared: torchao.quantization.quantize_(model, "
                               "awq_config(step='prepare')), run forwards, then step='convert'")
        observe._convert_unfolded(module, config)
    else:
        raise ValueError("through torchao.quantization.quantize_, AWQ runs in two steps: "
                         "awq_config(step='prepare'), your forwards, then awq_config(step='convert'); "
                         "for one call with calibration_data use awqtensor.quantize_")
    return module
