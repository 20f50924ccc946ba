"""Quantization configs: frozen, versioned dataclasses, validated on construction.

Both subclass torchao's ``AOBaseConfig``, so ``torchao.quantization.quantize_`` and
torchao's ``FqnToConfig`` accept them (see ``awqtensor.api`` for the handlers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torchao.core.config import AOBaseConfig

from .ops.w4a8 import check_mode

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
AWQ_STEPS = (None, "prepare", "convert")
ROUNDINGS = ("nearest", "gptq")


def _check_positive_int(owner: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class _Int4WeightConfig(AOBaseConfig):
    """Fields every int4 weight config has.

    group_size: input channels per (scale, zero) group, one of 32, 64, 128, or -1 for
        one group per output row. in_features need not be a multiple (see awqtensor.quant).
    zero_point: asymmetric quantization with a zero point (AutoAWQ's default) or symmetric.
    modules_to_not_convert: module names to leave in float; an entry matches any module
        whose qualified name contains it (AutoAWQ's and transformers' rule).
    activations: None (weight-only: activations stay in float) or "int8" (W4A8: int8
        dynamic activations per row and group wherever a call is large enough to gain;
        see awqtensor/ops/w4a8.py). AWQ then scores its searches with the int8 activations.
    """

    group_size: int = 128
    zero_point: bool = True
    modules_to_not_convert: tuple[str, ...] = ()
    version: int = 1
    activations: Optional[str] = None

    def __post_init__(self):
        owner = type(self).__name__
        if self.group_size not in SUPPORTED_GROUP_SIZES or isinstance(self.group_size, bool):
            raise ValueError(f"{owner}: group_size must be one of {SUPPORTED_GROUP_SIZES} "
                             f"(-1 = per output channel), got {self.group_size!r}")
        if not isinstance(self.zero_point, bool):
            raise TypeError(f"{owner}: zero_point must be True or False, got {self.zero_point!r}")
        skip = self.modules_to_not_convert
        if skip is None:
            skip = ()
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise TypeError(f"{owner}: modules_to_not_convert must be a list of module names, got {skip!r}")
        object.__setattr__(self, "modules_to_not_convert", tuple(skip))
        check_mode(owner, self.activations)


@dataclass(frozen=True)
class RTNConfig(_Int4WeightConfig):
    """Round-to-nearest int4: the accuracy baseline, and the way to build a quantized
    skeleton to load a saved state dict into."""


@dataclass(frozen=True)
class AWQConfig(_Int4WeightConfig):
    """Activation-aware int4 quantization (AWQ).

    n_grid: ratios tried in the scale search. duo_scaling: search x_mean^r / w_mean^(1-r)
    as well as x_mean^r. clip: search a per-group clipping range after scaling.
    max_shrink / n_clip_grid: the clipping search's range and resolution.
    n_samples x seq_len: calibration tokens (AutoAWQ's defaults, 128 x 512).
    n_finalists: the one-call scale search first scores every grid point by the group's
    Linear-output error (from second moments, over all tokens, nearly free), then runs
    the containing module on the calibration data for the identity and these best few.
    search_tokens: cap on the tokens those module runs use (whole batches, evenly
    spaced; None = all). Statistics and clipping always use all tokens, and so does the
    loss of a lone Linear (o_proj, down_proj), which is exact from its input's second
    moments without running anything.
    duo_scaling: True (AutoAWQ), False (x-only), or "both" (search both families).
    min_expert_tokens: a routed expert of a mixture of experts that receives fewer
        calibration tokens than this is quantized round-to-nearest (scale 1, no clipping):
        too few tokens to estimate its activations. One warning says how many did.
    step: None runs calibration and conversion in one call; "prepare" and "convert"
    split them for users running their own forward passes in between.
    act_scale: True stores AWQ's 1/s on the Linears of a group whose scale no earlier op can
        absorb (o_proj under grouped-query attention: the weight multiplies its input by
        it). False keeps scale 1 there (clipping is still searched): for formats without a
        per-input scale, such as llama.cpp's GGUF (``save_gguf``).
    base_config: a torchao per-module config (e.g. ``Int8WeightOnlyConfig()``): the search
    scores every candidate with that config's own quantization, folds the scales, and
    torchao's handler converts the Linears instead of awqtensor's int4 (one-call AWQ
    only; clipping only for configs quantizing in groups of group_size; see
    awqtensor/calibration/torchao_base.py).
    rounding: "nearest" (AWQ's) or "gptq": after the scale search and clipping, each
        Linear's scaled weight is rounded column by column with GPTQ's error feedback
        through its own calibration inputs' second moments (one-call only; the format is
        unchanged: awqtensor/calibration/gptq.py). damp: GPTQ's dampening, a fraction of
        the mean diagonal of XᵀX.
    scale_search: False skips AWQ's scale search (scale 1 everywhere): with clip=False
        and rounding="gptq" this is GPTQ alone (``gptq_config``).
    """

    n_grid: int = 20
    duo_scaling: bool | str = True
    clip: bool = True
    max_shrink: float = 0.5
    n_clip_grid: int = 20
    n_samples: int = 128
    seq_len: int = 512
    n_finalists: int = 4
    search_tokens: Optional[int] = None
    min_expert_tokens: int = 32
    step: Optional[str] = None
    act_scale: bool = True
    base_config: Optional[AOBaseConfig] = None
    rounding: str = "nearest"
    damp: float = 0.01
    scale_search: bool = True

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        _check_positive_int(owner, "n_grid", self.n_grid)
        _check_positive_int(owner, "n_clip_grid", self.n_clip_grid)
        _check_positive_int(owner, "n_samples", self.n_samples)
        _check_positive_int(owner, "seq_len", self.seq_len, minimum=2)
        _check_positive_int(owner, "n_finalists", self.n_finalists)
        _check_positive_int(owner, "min_expert_tokens", self.min_expert_tokens)
        if self.search_tokens is not None:
            _check_positive_int(owner, "search_tokens", self.search_tokens)
        if self.duo_scaling not in (True, False, "both"):
            raise ValueError(f"{owner}: duo_scaling must be True, False or 'both', got {self.duo_scaling!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"{owner}: rounding must be one of {ROUNDINGS} ('gptq': error-feedback rounding on "
                             f"the calibration inputs), got {self.rounding!r}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0.0 < self.damp < 1.0:
            raise ValueError(f"{owner}: damp must be in (0, 1), a fraction of XᵀX's mean diagonal; got {self.damp!r}")
        if self.rounding == "gptq" and self.step is not None:
            raise ValueError(f"{owner}: rounding='gptq' needs one-call calibration (step=None): it reads each "
                             f"Linear's inputs after the block's scales are folded")
        if self.rounding == "gptq" and self.base_config is not None:
            raise ValueError(f"{owner}: rounding='gptq' writes awqtensor's int4 codes; with base_config the torchao "
                             f"config rounds its own weights: drop one of them")
        for name in ("clip", "act_scale", "scale_search"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{owner}: {name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.max_shrink, (int, float)) or not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"{owner}: max_shrink must be in [0, 1), the largest fraction of the "
                             f"range clipping may cut; got {self.max_shrink!r}")
        if self.step not in AWQ_STEPS:
            raise ValueError(f"{owner}: step must be one of {AWQ_STEPS}, got {self.step!r}")
        if not self.act_scale and self.step is not None:
            raise ValueError(f"{owner}: act_scale=False needs one-call AWQ (step=None): the two-step path keeps "
                             f"every scale in act_scale")
        if self.base_config is not None:
            from .calibration import torchao_base

            torchao_base.check(self.base_config, owner)
            if self.activations is not None:
                raise ValueError(f"{owner}: activations= belongs to awqtensor's int4 format; with base_config "
                                 f"the torchao config decides how activations are quantized")
            if self.step is not None:
                raise ValueError(f"{owner}: base_config runs in one call (step=None) with calibration_data")


def rtn_config(group_size: int = 128, zero_point: bool = True, modules_to_not_convert=None,
               activations: Optional[str] = None) -> RTNConfig:
    """Round-to-nearest int4 config; ``activations="int8"`` for W4A8."""
    return RTNConfig(group_size, zero_point, modules_to_not_convert, activations=activations)


def awq_config(group_size: int = 128, zero_point: bool = True, modules_to_not_convert=None, **options) -> AWQConfig:
    """AWQ config; ``options`` are AWQConfig's other fields (n_grid, duo_scaling, clip,
    rounding="gptq" for AWQ's scales with GPTQ's error-feedback rounding, ...)."""
    return AWQConfig(group_size, zero_point, modules_to_not_convert, **options)


def gptq_config(group_size: int = 128, zero_point: bool = True, modules_to_not_convert=None, **options) -> AWQConfig:
    """GPTQ alone (no AWQ scales, no clipping), in the same tensor and formats: the same
    calibration pass (``n_samples``, ``seq_len``, ``damp``, ``activations``, ...)."""
    fixed = dict(rounding="gptq", scale_search=False, clip=False)
    clash = sorted(k for k in fixed if k in options and options[k] != fixed[k])
    if clash:
        raise ValueError(f"gptq_config sets {clash} itself; for AWQ's scales with GPTQ rounding use "
                         f"awq_config(..., rounding='gptq')")
    return AWQConfig(group_size, zero_point, modules_to_not_convert, **{**options, **fixed})
