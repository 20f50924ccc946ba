"""Perplexity on a text file, by the reference protocol of ../shared/data/README.md:
tokenize the whole file (no special tokens), cut consecutive blocks from token 0,
perplexity = exp(mean over blocks of each block's mean cross-entropy)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def token_blocks(tokenizer, path, seq_len: int = 512, n_blocks: int | None = None) -> torch.Tensor:
    """[n_blocks, seq_len] token ids cut from the start of the file at ``path``."""
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"{path} has {ids.numel()} tokens, fewer than one block of {seq_len}; "
                         f"use a longer text or a smaller seq_len")
    n_blocks = available if n_blocks is None else n_blocks
    if n_blocks > available:
        raise ValueError(f"{path} holds {available} blocks of {seq_len} tokens, {n_blocks} were asked for")
    return ids[: n_blocks * seq_len].reshape(n_blocks, seq_len)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, desc: str = "perplexity") -> float:
    """exp(mean over blocks of the mean next-token cross-entropy), one block at a time."""
    device = next(model.parameters()).device
    losses = []
    for block in tqdm(blocks, desc=desc, unit="block", disable=None, leave=False):
        ids = block.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        losses.append(F.cross_entropy(logits, ids[0, 1:]).item())
    return math.exp(sum(losses) / len(losses))
