"""Calibration data in, model-input batches out.

Accepted: a [n, T] tensor or a list of 1-D token-id tensors / lists; a list of strings
(or one string, or a text file's Path) with ``tokenizer=``; or an iterable of
model-input dicts, used as they are. Token ids are concatenated and cut into
``seq_len`` blocks from token 0 (AutoAWQ's rule), the first ``n_samples`` kept.

Padding: a dict's 2-D ``attention_mask`` [batch, seq] marks its real tokens. Padded
positions still run through the model (the mask keeps them out of attention), but they
are left out of everything calibration measures: the activation statistics that choose
the scales, the second moments that choose the clipping, and the output error that
scores both. So padding-heavy batches calibrate like the same texts unpadded. Where a
tensor does not have the [batch, seq, ...] shape of its mask (tokens gathered for one
expert of a mixture of experts, say), all its rows count.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

BATCH_SIZE = 4  # blocks per forward: bounds attention-mask and activation memory


def token_mask(batch) -> torch.Tensor | None:
    """The real (non-padding) positions of a model-input dict, [batch, seq] bool, or None."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask.bool()


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` [batch, seq, ...] at real tokens, [n_real, ...] (all rows if ``mask``
    is None or does not fit ``x``'s leading dimensions)."""
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(x.device)]


def calibration_batches(data, n_samples: int, seq_len: int, tokenizer=None, vocab_size: int | None = None):
    """A list of model-input dicts, each ``{"input_ids": [b, seq_len]}`` (or the user's own dicts)."""
    if data is None:
        raise ValueError("AWQ needs calibration data: pass calibration_data= (token ids, texts with "
                         "tokenizer=, or model-input dicts), or use rtn_config() for data-free quantization")
    if isinstance(data, Path):
        data = [data.read_text(encoding="utf-8")]
    elif isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        data = list(data.reshape(-1, data.shape[-1])) if data.dim() > 1 else [data]
    data = list(data)
    if not data:
        raise ValueError("calibration_data is empty")
    if all(isinstance(d, dict) for d in data):
        return data
    if all(isinstance(d, str) for d in data):
        if tokenizer is None:
            raise TypeError("calibration_data holds strings: pass tokenizer= so they can be tokenized")
        data = [tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0] for text in data]
    try:
        ids = torch.cat([torch.as_tensor(d, dtype=torch.long).reshape(-1) for d in data])
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError("calibration_data must be token ids (tensors or lists of ints), strings with "
                        "tokenizer=, or model-input dicts; got a mix or something else") from error
    if vocab_size is not None and ids.numel() and (ids.max() >= vocab_size or ids.min() < 0):
        raise ValueError(f"calibration token ids span {ids.min().item()}..{ids.max().item()} but the model's "
                         f"vocabulary has {vocab_size} entries: tokenize with this model's tokenizer")
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"calibration data has {ids.numel()} tokens, fewer than one sequence of "
                         f"seq_len={seq_len}: give more text or lower seq_len")
    if available < n_samples:
        warnings.warn(f"calibration data holds {available} sequences of {seq_len} tokens, fewer than "
                      f"n_samples={n_samples}; calibrating on {available}", stacklevel=3)
    blocks = ids[: min(available, n_samples) * seq_len].reshape(-1, seq_len)
    return [{"input_ids": batch} for batch in blocks.split(BATCH_SIZE)]
