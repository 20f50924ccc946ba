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

from .config import AWQConfig, RTNConfig, _Int4WeightConfig
from .tensor import Int4AWQTensor, validate_weight

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, name: str) -> bool:
    """Every nn.Linear except the output head."""
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"


def select_linears(model: nn.Module, config: _Int4WeightConfig, filter_fn: Optional[FilterFn] = None):
    """[(name, module)] to quantize; raises if the filter picks something that is not a Linear."""
    filter_fn = filter_fn or default_filter
    selected = []
    for name, module in model.named_modules():
        if not filter_fn(module, name):
            continue
        if any(skip in name for skip in config.modules_to_not_convert):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"filter_fn selected {name or '<root>'} ({type(module).__name__}), which is not "
                            f"an nn.Linear; make the filter return True for Linear modules only")
        selected.append((name, module))
    return selected


def quantize_(
    model: nn.Module,
    config: _Int4WeightConfig,
    *,
    calibration_data=None,
    filter_fn: Optional[FilterFn] = None,
) -> nn.Module:
    """Quantize ``model``'s Linear weights in place to Int4AWQTensor and return the model.

    Selection: ``filter_fn(module, name)`` if given, else every nn.Linear but ``lm_head``;
    names in ``config.modules_to_not_convert`` are always left alone. Every selected
    module is validated before any is converted, so a failure leaves the model unchanged.
    """
    if not isinstance(config, (RTNConfig, AWQConfig)):
        raise TypeError(f"quantize_ takes rtn_config(...) or awq_config(...), got {type(config).__name__}; "
                        f"for torchao's own configs call torchao.quantization.quantize_")
    selected = select_linears(model, config, filter_fn)
    if not selected:
        raise ValueError(f"quantize_ found no nn.Linear to quantize in {type(model).__name__} "
                         f"(filter_fn={filter_fn}, modules_to_not_convert={config.modules_to_not_convert})")
    for name, module in selected:
        validate_weight(module.weight, config.group_size, name=f"{name}.weight")
    if isinstance(config, AWQConfig):
        raise NotImplementedError("AWQ calibration is not implemented yet; use rtn_config() for now")
    for name, module in tqdm(selected, desc="quantizing", unit="linear", disable=None, leave=False):
        _swap_weight(module, config)
    return model


def _swap_weight(module: nn.Linear, config: _Int4WeightConfig, act_scale: torch.Tensor | None = None) -> nn.Linear:
    weight = Int4AWQTensor.from_float(module.weight.detach(), config.group_size, config.zero_point, act_scale)
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


@register_quantize_module_handler(RTNConfig)
def _rtn_handler(module: nn.Module, config: RTNConfig, **_) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"rtn_config applies to nn.Linear, got {type(module).__name__}")
    validate_weight(module.weight, config.group_size)
    return _swap_weight(module, config)
