"""AWQ over torchao's own configs: ``awq_config(..., base_config=<torchao AOBaseConfig>)``.

The AWQ scale search runs as for int4, but every candidate is scored with the Linears
quantized by the base config's own handler (its weights, and its activations where it
quantizes them) reading ``x / s``; the scale is then folded into the producer and
torchao's handler converts the scaled Linear. torchao's tensors cannot pre-scale their
input, so a mapping whose scale nothing can absorb (``fold == "act_scale"``) keeps scale
1, with one warning naming it. Clipping is searched, through the config's own weight
quantization, when the config quantizes in groups of awq_config's group_size
(``group_wise``: torchao's PerGroup); per-row configs get no clipping (a row's scale
would depend on every group's range at once).
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.core.config import AOBaseConfig


def check(base_config, owner: str = "AWQConfig") -> None:
    """Raise TypeError/ValueError, saying what to change, if ``base_config`` is not a torchao
    per-module config."""
    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

    from ..config import _Int4WeightConfig

    if not isinstance(base_config, AOBaseConfig):
        raise TypeError(f"{owner}: base_config must be a torchao AOBaseConfig such as "
                        f"torchao.quantization.Int8WeightOnlyConfig(), got {type(base_config).__name__}")
    if isinstance(base_config, _Int4WeightConfig):
        raise ValueError(f"{owner}: base_config is for torchao's own configs; awqtensor's int4 is "
                         f"awq_config itself (leave base_config out)")
    if type(base_config) not in _QUANTIZE_CONFIG_HANDLER:
        raise ValueError(f"{owner}: torchao has no per-module handler for {type(base_config).__name__} "
                         f"(mixes such as FqnToConfig hold per-module configs: pass one of those)")


def group_wise(base_config, group_size: int) -> bool:
    """Whether ``base_config`` quantizes weights in groups of ``group_size`` along K, each on
    its own (torchao's PerGroup granularity): then clipping can be searched per group."""
    from torchao.quantization.granularity import PerGroup

    granularity = getattr(base_config, "granularity", None) or getattr(base_config, "weight_granularity", None)
    return isinstance(granularity, PerGroup) and granularity.group_size == group_size


def quantize_linear(linear: nn.Linear, base_config) -> nn.Linear:
    """``linear`` converted in place by torchao's handler for ``base_config``."""
    from torchao.quantization import quantize_

    quantize_(linear, base_config, filter_fn=lambda module, _: module is linear)
    return linear


def quantized_weight(w: torch.Tensor, base_config) -> torch.Tensor:
    """The tensor torchao's handler makes of the float weight ``w`` [N, K]."""
    tmp = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    tmp.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return quantize_linear(tmp, base_config).weight.detach()


def fake_quantize(w: torch.Tensor, base_config) -> torch.Tensor:
    """``w`` through the base config's weight quantization and back, in w's dtype."""
    q = quantized_weight(w, base_config)
    return (q.dequantize() if hasattr(q, "dequantize") else q).to(w.dtype)


def probe(selected, base_config) -> None:
    """Quantize and run a float copy of each distinct Linear shape with ``base_config``
    before anything is converted; raise ValueError naming the first it cannot handle."""
    seen = set()
    for name, linear in selected:
        key = (tuple(linear.weight.shape), linear.weight.dtype, linear.bias is not None)
        if key in seen:
            continue
        seen.add(key)
        n, k = linear.weight.shape
        tmp = nn.Linear(k, n, bias=linear.bias is not None, dtype=linear.weight.dtype)
        try:
            quantize_linear(tmp, base_config)
            with torch.no_grad():
                tmp(torch.randn(2, k, dtype=linear.weight.dtype))
        except Exception as err:  # noqa: BLE001  (whatever torchao raises, reported with the Linear)
            raise ValueError(f"base_config {type(base_config).__name__} cannot quantize {name} ([{n}, {k}], "
                             f"{linear.weight.dtype}): {type(err).__name__}: {err}. Choose a config (or a "
                             f"granularity) that fits this shape, or leave the Linear out with "
                             f"modules_to_not_convert") from err
