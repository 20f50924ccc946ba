"""Fuzzing: random corruptions of a saved checkpoint (tests/fuzz_checkpoints.py) must end
in a clear error or the identical model. A bounded number of examples here; a long run
that counts outcomes is ``python benchmarks/fuzz.py``."""

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awqtensor import load_quantized, quantize_, quantize_head_, rtn_config, save_quantized
from conftest import tiny_llama
from fuzz_checkpoints import CORRUPTIONS, outcome

EXAMPLES = 25


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A sharded awqtensor checkpoint (an 8-bit head, zero points, an act_scale-free RTN
    model in three or more files), its tokens and its logits."""
    model = tiny_llama(3)
    quantize_(model, rtn_config(group_size=32))
    quantize_head_(model)
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    save_quantized(model, path, shard_size="40KB")
    tokens = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        want = load_quantized(path)(tokens).logits
    return path, tokens, want


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(rng=st.randoms(use_true_random=False))
def test_a_corrupted_checkpoint_is_refused_or_loads_identically(saved, corruption, rng):
    path, tokens, want = saved
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "ckpt"
        shutil.copytree(path, copy)
        what = CORRUPTIONS[corruption](rng, copy)
        try:
            outcome(load_quantized, copy, tokens, want)
        except AssertionError as err:
            raise AssertionError(f"{what}: {err}") from None
