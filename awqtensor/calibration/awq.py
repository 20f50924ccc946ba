"""The one-call AWQ path: block by block, mapping by mapping.

For each block (in fp32, whatever the model's dtype):
  1. discover the mappings (once per block type, see ``mappings``);
  2. for each mapping in execution order: run the block on the calibration inputs up to
     the mapping's loss module, recording that module's inputs and outputs and the
     group's input statistics (mean |x| and per-group second moments); search the
     shared scale by the loss module's output MSE; search clipping per Linear and keep
     it only where the loss module's output error drops (this is how q/k end up
     unclipped when clipping hurts them, without naming them); fold;
  3. convert the block's Linears to Int4AWQTensor and compute the next block's inputs.

Where we follow AutoAWQ: the scale formula and its normalisation, w_mean, x_mean, the
ratio grid, the loss on the containing module's output, clipping after scaling.
Where we differ, and why:
  * the identity scale is always a candidate, so a mapping never ends worse than RTN
    by the search's own measure, and a non-finite loss falls back to it with a warning;
  * later mappings of a block are captured after earlier ones are folded, so each
    search sees the block as it will be (AutoAWQ divides stored inputs by hand);
  * clipping is scored on every calibration token through per-group second moments,
    shrinks both ends of an asymmetric range, and is kept per Linear only if it lowers
    the loss module's error (AutoAWQ subsamples 512 tokens and skips q/k by name);
  * the next block is fed the *quantized* block's output by default (AutoAWQ feeds the
    float one); ``benchmarks/awq_quality.py --propagate`` measures both. That output is
    computed from the dequantized weights with torch's matmuls (``_exact_weights``), never
    through the int4 kernels: their route depends on the call's size and the CPU (the
    int8-activation kernel, a dense fp32 or bf16 route), and the chosen scales must not.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import packing, quant
from ..ops import w4a8
from ..tensor import Int4AWQTensor
from ..memory import file_backed, release_file_pages, release_freed_memory
from .blocks import (StopForward, cast_floats, find_blocks, first_block_inputs, first_tensor, replay,
                     run_block)
from .data import calibration_batches, real_tokens, token_mask
from . import gptq, torchao_base
from .mappings import Mapping, apply_fold, discover
from .observe import InputStats
from .search import (clip_weight, moment_loss, scaled_grams, search_clip, search_clip_with, search_scale,
                     weight_profile)

log = logging.getLogger("awqtensor")

PROPAGATE = ("quantized", "float")


class _Capture:
    """One pass of the block over the calibration inputs, stopped after ``loss_module``,
    with running statistics of the group's input. When the loss module is the group's
    lone Linear its output error is exact from the input's full second moments,
    ``Σ_n e_n (Σ xᵀx) e_nᵀ``, so nothing is recorded, as long as that K x K matrix is
    smaller than the records would be; otherwise the loss module's (args, kwargs,
    output) are recorded for the ``loss_batches``."""

    def __init__(self, block: nn.Module, mapping: Mapping, inputs, group_size: int, loss_batches: set[int],
                 masks=None, exact_lone: bool = True):
        masks = masks or [None] * len(inputs)
        first = block.get_submodule(mapping.linears[0])
        module = block.get_submodule(mapping.loss_module) if mapping.loss_module else block
        self.lone = exact_lone and module is first and isinstance(first, nn.Linear) and _gram_is_smaller(
            first, group_size, sum(_tokens(*inputs[i]) for i in loss_batches))
        self.records, self.stats = [], InputStats(group_size, full=self.lone)
        if self.lone:
            self.reference = first.weight.detach().clone()

        def stats(_, args):
            self.stats.update(real_tokens(args[0], masks[self.batch]))
            if self.lone:
                raise StopForward

        def grab_in(_, args, kwargs):
            if self.batch in loss_batches:
                self.records.append([args, kwargs, None, masks[self.batch]])

        def grab_out(_, args, kwargs, out):
            if self.batch in loss_batches:
                self.records[-1][2] = first_tensor(out).detach()
            raise StopForward

        handles = [first.register_forward_pre_hook(stats)]
        if not self.lone:
            handles += [module.register_forward_pre_hook(grab_in, with_kwargs=True),
                        module.register_forward_hook(grab_out, with_kwargs=True)]
        try:
            for self.batch in replay(block, inputs):
                pass
        finally:
            for h in handles:
                h.remove()
        self.module = module

    def loss(self) -> float:
        """Mean squared error of the loss module's output against the float one."""
        with torch.no_grad():
            if self.lone:
                k = self.reference.shape[1]
                e = (self.module.weight.detach() - self.reference).double()
                return ((e @ self.stats.gram[:k, :k]) * e).sum().item() / (self.stats.tokens * e.shape[0])
            total, count = 0.0, 0
            for args, kwargs, target, mask in self.records:
                out = first_tensor(self.module(*args, **kwargs))
                error = real_tokens(out.float() - target.float(), mask)
                total += error.pow(2).sum().item()
                count += error.numel()
        return total / count


def _tokens(args, kwargs) -> int:
    hidden = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    return 1 if hidden is None else hidden.shape[:-1].numel()


def _gram_is_smaller(linear: nn.Linear, group_size: int, tokens: int) -> bool:
    """Whether the fp64 [K_padded, K_padded] second moments take fewer bytes than
    recording ``tokens`` fp32 inputs and outputs of ``linear``."""
    k, n = linear.in_features, linear.out_features
    kp = quant.n_groups(k, k if group_size == -1 else group_size) * (k if group_size == -1 else group_size)
    return kp * kp * 8 <= tokens * (k + n) * 4


def _loss_batches(inputs, search_tokens: int | None) -> set[int]:
    """Evenly spaced batch indices holding about ``search_tokens`` tokens (None: all)."""
    if search_tokens is None:
        return set(range(len(inputs)))
    per_batch = max(_tokens(*batch) for batch in inputs)
    n = min(len(inputs), max(1, math.ceil(search_tokens / per_batch)))
    return {int(i * len(inputs) / n) for i in range(n)}


def _routed_inputs(block: nn.Module, experts: str, inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden_states, top_k_index) that the RoutedExperts at ``experts`` receive for each
    batch: one pass of the block, stopped there."""
    captured = []

    def grab(_, args, kwargs):
        params = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args), **kwargs)
        captured.append((params["hidden_states"].detach(), params["top_k_index"].detach()))
        raise StopForward

    handle = block.get_submodule(experts).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for _ in replay(block, inputs):
            pass
    finally:
        handle.remove()
    return captured


def _tokens_of_expert(block, expert: str, inputs, masks, routed: dict):
    """Per batch, (hidden_states, indices of the real tokens routed to ``expert``). The
    experts' inputs are captured once per block, when their first mapping comes:
    calibrating an expert changes nothing upstream of the experts."""
    experts, _, index = expert.rpartition(".")
    if experts not in routed:
        routed.clear()  # another experts module's, no longer needed
        routed[experts] = _routed_inputs(block, experts, inputs)
    out = []
    for (hidden, top_k), mask in zip(routed[experts], masks or [None] * len(inputs)):
        chosen = (top_k == int(index)).any(-1)
        if mask is not None and mask.numel() == chosen.numel():  # tokens flattened from [batch, seq]
            chosen &= mask.reshape(-1).to(chosen.device)
        out.append((hidden, chosen.nonzero().squeeze(-1)))
    return out


def _calibrate_mapping(block, mapping: Mapping, inputs, masks, config, where: str, starved: list,
                       routed: dict | None = None, unscaled: list | None = None):
    """Search, clip and fold one mapping in place; returns the scale the Linears must keep
    as act_scale (1/s) when nothing could fold it, else None. A routed expert's mapping is
    calibrated on that expert alone, fed the tokens routed to it (``routed`` caches the
    experts' inputs); one that saw fewer than ``config.min_expert_tokens`` tokens is left
    as it is (round-to-nearest) and its label appended to ``starved``. With a torchao
    ``base_config``, a mapping nothing can fold keeps scale 1 and is appended to ``unscaled``."""
    linears = [block.get_submodule(n) for n in mapping.linears]
    gs = config.group_size
    label = f"{where}{'{' + ','.join(mapping.linears) + '}' if len(linears) > 1 else mapping.linears[0]}"
    if mapping.expert:  # only the tokens routed to this expert, from the experts' captured inputs
        expert = block.get_submodule(mapping.expert)
        routed_tokens = _tokens_of_expert(block, mapping.expert, inputs, masks, {} if routed is None else routed)
        inputs = [((hidden[tokens],), {}) for hidden, tokens in routed_tokens if tokens.numel()]
        if sum(_tokens(*batch) for batch in inputs) < config.min_expert_tokens:
            starved.append(label)
            return None
        block, mapping, masks = expert, mapping.within(mapping.expert), None
    base = config.base_config
    if base is not None and mapping.fold == "act_scale":  # torchao's tensors cannot pre-scale their input
        unscaled.append(f"{label} ({mapping.reason or 'no producer found'})")
        return None
    # W4A8: the loss module runs with the Linears' inputs quantized as the format will (so
    # a lone Linear's loss is not the weights-only closed form: it is run too).
    capture = _Capture(block, mapping, inputs, gs, _loss_batches(inputs, config.search_tokens), masks,
                       exact_lone=config.activations is None and base is None)
    originals = [lin.weight.detach().clone() for lin in linears]
    trying = [None]  # the scale loss_with is scoring: the Linears read x / s, quantized

    def quantized_input(_, args):
        s = trying[0]
        return (w4a8.fake_quantize_activations(args[0] / s, gs) * s, *args[1:])

    def scaled_input(_, args):  # a torchao weight holds Q(W * s): it must read x / s
        return (args[0] / trying[0], *args[1:])

    hook = scaled_input if base is not None else quantized_input if config.activations else None
    hooks = [lin.register_forward_pre_hook(hook) for lin in linears] if hook else []
    try:
        return _search_and_fold(block, mapping, linears, originals, capture, config, label, trying,
                                search=config.scale_search and (config.act_scale or mapping.fold != "act_scale"))
    finally:
        for h in hooks:
            h.remove()


def _search_and_fold(block, mapping, linears, originals, capture, config, label, trying, search=True):
    gs = config.group_size
    x_mean = (capture.stats.abs_sum / capture.stats.tokens).float()
    grams = (capture.stats.grams / capture.stats.tokens).float()
    if not (torch.isfinite(x_mean).all() and torch.isfinite(grams).all()):
        warnings.warn(f"{label}: NaN/Inf in the calibration activations; using scale 1 and no clipping "
                      f"here (plain round-to-nearest)", stacklevel=5)
        return None

    base = config.base_config

    def loss_with(scaled: list[torch.Tensor], s: torch.Tensor) -> float:
        trying[0] = s
        for lin, w in zip(linears, scaled):
            if base is not None:  # the config's own tensor of W * s; the hook divides x by s
                lin.weight = nn.Parameter(torchao_base.quantized_weight(w, base), requires_grad=False)
            else:
                lin.weight.data = quant.fake_quantize(w, gs, config.zero_point) / s
        return capture.loss()

    w_mean = weight_profile(originals, gs)
    fake = (lambda ws: torchao_base.fake_quantize(ws, base)) if base is not None else None
    if search:
        s, choice, before, after = search_scale(
            lambda s: loss_with([w * s for w in originals], s), x_mean, w_mean, config.n_grid, config.duo_scaling,
            screen_fn=lambda s: moment_loss(originals, grams, s, gs, config.zero_point, fake),
            finalists=config.n_finalists)
    else:  # act_scale=False and nothing can fold a scale: scale 1, clipping only
        s, choice = torch.ones_like(x_mean), "scale 1 (act_scale=False)"
        before = after = loss_with(list(originals), s)
    if not math.isfinite(after):
        warnings.warn(f"{label}: no scale gave a finite loss; using scale 1", stacklevel=5)
    scaled = [w * s for w in originals]
    if config.clip and (base is None or torchao_base.group_wise(base, gs)):
        grams = scaled_grams(grams, s)  # the Linears will read x / s
        for i, w in enumerate(scaled):
            if base is None:
                lo, hi = search_clip(w, grams, gs, config.zero_point, config.max_shrink, config.n_clip_grid)
            else:  # the config's own grid; both ends of the range shrink together
                lo, hi = search_clip_with(w, grams, gs, fake, config.max_shrink, config.n_clip_grid)
            trial = list(scaled)
            trial[i] = clip_weight(w, lo, hi, gs, config.zero_point or base is not None)
            clipped_loss = loss_with(trial, s)
            if clipped_loss < after:
                scaled, after = trial, clipped_loss
            else:
                log.debug("%s: clipping %s skipped (loss %.4g vs %.4g)", label, mapping.linears[i], clipped_loss, after)
    log.debug("%s: loss %.4g -> %.4g (%s)", label, before, after, choice)
    for lin, w in zip(linears, scaled):
        if base is not None:
            lin.weight = nn.Parameter(w, requires_grad=False)
        else:
            lin.weight.data = w / s if mapping.fold == "act_scale" else w
    if not search:
        return None
    apply_fold(block, mapping, s)
    return s if mapping.fold == "act_scale" else None


def _input_moments(block: nn.Module, linears: list[tuple[str, nn.Linear]], inputs, masks) -> dict[str, torch.Tensor]:
    """{name: Σ xᵀx [K, K]} of each Linear's input over the real calibration tokens (padded
    positions left out), from one run of ``block`` per batch as it stands (scales folded).
    Linears fed the same tensor (q/k/v, gate/up) share one matrix: a Llama-3-8B-shaped
    block holds four (three 4096², one 14336²: 1.0 GB in fp32), SmolLM2's 13 MB."""
    sums, owner, hooks, batch = {}, {}, [], {}

    def record(name):
        def hook(_, args):
            x = args[0]
            cached = batch.get(id(x))
            if cached is not None and cached[0] is x:  # another Linear already read this tensor
                owner.setdefault(name, cached[1])
                return
            rows = real_tokens(x, batch.get("mask"))
            rows = rows.reshape(-1, rows.shape[-1]).float()
            key = owner.setdefault(name, name)
            sums[key] = rows.T @ rows if key not in sums else sums[key].addmm_(rows.T, rows)
            batch[id(x)] = (x, key)  # x is kept, so its id cannot be reused within the batch
        return hook

    for name, linear in linears:
        hooks.append(linear.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            for (args, kwargs), mask in zip(inputs, masks or [None] * len(inputs)):
                batch.clear()
                batch["mask"] = mask
                block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[key] for name, key in owner.items()}


def _gptq_weight(weight: torch.Tensor, h: torch.Tensor | None, act_scale, config, label: str) -> Int4AWQTensor:
    """``weight`` (already scaled and clipped) as an Int4AWQTensor whose codes are rounded
    with GPTQ's error feedback under ``h``; round-to-nearest, with a warning naming the
    Linear, when no calibration token reached it or H stays singular."""
    def nearest() -> Int4AWQTensor:
        return Int4AWQTensor.from_float(weight, config.group_size, config.zero_point, act_scale,
                                        name=f"{label}.weight", activations=config.activations)

    if h is None or not bool(h.diagonal().gt(0).any()):
        warnings.warn(f"{label}: no calibration token reached it, so it is rounded to nearest (GPTQ needs its "
                      f"inputs)", stacklevel=4)
        return nearest()
    group_size = weight.shape[1] if config.group_size == -1 else config.group_size
    scales, zeros = quant.choose_qparams(weight, group_size, config.zero_point)
    codes = gptq.gptq_codes(weight.float(), h, scales, zeros, group_size, damp=config.damp)
    if codes is None:
        warnings.warn(f"{label}: its inputs' XᵀX stayed singular after dampening, so it is rounded to nearest",
                      stacklevel=4)
        return nearest()
    act = None if act_scale is None else act_scale.to(device=weight.device, dtype=scales.dtype)
    tensor = Int4AWQTensor(packing.pack_nibbles(codes), scales, group_size, weight.shape, packing.PLAIN, zeros,
                           act, config.activations)
    return tensor._repacked_for(weight.device, weight.dtype)


@contextmanager
def _exact_weights(linears: list[tuple[str, nn.Linear]], config):
    """Inside, each Int4AWQTensor weight of ``linears`` is the float weight it stands for
    (dequantized, act_scale included), so the block runs on torch's matmuls whatever call
    sizes and CPU the kernels' routes depend on; W4A8 weights also read their input as the
    format quantizes it (int8 per row and group of x * act_scale). Restored on exit."""
    saved, hooks = [], []
    for _, linear in linears:
        weight = linear.weight
        if not isinstance(weight, Int4AWQTensor):
            continue
        saved.append((linear, weight))
        linear.weight = nn.Parameter(weight.dequantize(), requires_grad=False)
        if weight.activations is not None:
            act = weight.act_scale

            def format_input(_, args, act=act, group_size=weight.group_size):
                x = args[0] if act is None else args[0] * act
                x = w4a8.fake_quantize_activations(x, group_size)
                return (x if act is None else x / act, *args[1:])

            hooks.append(linear.register_forward_pre_hook(format_input))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for linear, weight in saved:
            linear.weight = weight


def calibrate(model: nn.Module, config, selected, calibration_data, tokenizer=None, *, propagate: str = "quantized"):
    """Run AWQ on ``model`` and convert the ``selected`` [(name, Linear)] in place."""
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    if config.base_config is not None:  # before anything changes: every shape must suit the config
        torchao_base.probe(selected, config.base_config)
    names = {id(m): n for n, m in selected}
    try:  # to catch ids from another tokenizer before they index past the embedding table
        vocab = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        vocab = None
    batches = calibration_batches(calibration_data, config.n_samples, config.seq_len, tokenizer, vocab)
    prefix, blocks = find_blocks(model, [m for _, m in selected])
    masks = [token_mask(batch) for batch in batches]
    with torch.no_grad():
        inputs = cast_floats(first_block_inputs(model, blocks[0], batches), torch.float32)
    done, discovered, starved, unscaled = set(), {}, [], []
    for index, block in enumerate(tqdm(blocks, desc="AWQ", unit="block", disable=None)):
        where = f"{prefix}.{index}." if prefix else ""
        block_linears = [(n, m) for n, m in block.named_modules() if id(m) in names]
        dtype = next(block.parameters()).dtype
        last = index == len(blocks) - 1
        float_outputs, mapped = None, []
        if block_linears:
            mapped = file_backed(block.parameters())  # replaced by int4 below: their pages go after
            block.float()
            key = (type(block), tuple(n for n, _ in block_linears))
            if key not in discovered:
                discovered[key] = discover(block, *inputs[0], [n for n, _ in block_linears])
                for mapping in discovered[key]:
                    log.debug("%s mapping %s", type(block).__name__, mapping.describe())
            if propagate == "float" and not last:
                float_outputs = run_block(block, inputs, torch.float32)
            act_scales, routed = {}, {}
            for mapping in discovered[key] if config.scale_search or config.clip else ():
                s = _calibrate_mapping(block, mapping, inputs, masks, config, where, starved, routed, unscaled)
                release_freed_memory()
                for n in mapping.linears:
                    act_scales[n] = s
            moments = _input_moments(block, block_linears, inputs, masks) if config.rounding == "gptq" else {}
            block.to(dtype)
            for n, linear in block_linears:
                s = act_scales.get(n)
                if config.base_config is not None:  # torchao's handler converts the folded float Linear
                    torchao_base.quantize_linear(linear, config.base_config)
                    done.add(id(linear))
                    continue
                weight = linear.weight.detach()
                h = moments.pop(n, None)
                if s is not None:
                    weight = (weight.float() * s).to(dtype)
                    if h is not None:  # the int4 weight reads x / s
                        h = h / (s.unsqueeze(0) * s.unsqueeze(1))
                    s = (1 / s).to(dtype)
                if config.rounding == "gptq":
                    quantized = _gptq_weight(weight, h, s, config, f"{where}{n}")
                else:
                    quantized = Int4AWQTensor.from_float(weight, config.group_size, config.zero_point, s,
                                                         name=f"{where}{n}.weight", activations=config.activations)
                linear.weight = nn.Parameter(quantized, requires_grad=False)
                done.add(id(linear))
            del moments
        if not last:
            if float_outputs is None:
                with _exact_weights(block_linears, config):
                    float_outputs = run_block(block, inputs, dtype)
            inputs = cast_floats(float_outputs, torch.float32)
        release_file_pages(mapped)
        del mapped
        release_freed_memory()
    if unscaled:
        name = type(config.base_config).__name__
        warnings.warn(f"{len(unscaled)} Linear groups keep AWQ scale 1 under {name}: nothing can fold their "
                      f"scale and {name}'s tensors cannot pre-scale their input ({unscaled[0]}, ...)", stacklevel=3)
    if starved:
        warnings.warn(f"{len(starved)} expert Linear groups saw fewer than min_expert_tokens="
                      f"{config.min_expert_tokens} calibration tokens ({starved[0]}, ...); they are quantized "
                      f"round-to-nearest. More or more varied calibration data reaches more experts",
                      stacklevel=3)
    rest = [(n, m) for n, m in selected if id(m) not in done]
    if rest:
        warnings.warn(f"{len(rest)} Linears lie outside the calibrated blocks ({rest[0][0]}, ...); they are "
                      f"quantized round-to-nearest", stacklevel=3)
        for name, linear in rest:
            if config.base_config is not None:
                torchao_base.quantize_linear(linear, config.base_config)
                continue
            linear.weight = nn.Parameter(Int4AWQTensor.from_float(
                linear.weight.detach(), config.group_size, config.zero_point, name=f"{name}.weight",
                activations=config.activations), requires_grad=False)
    return model
