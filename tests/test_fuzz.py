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


# -- malformed tensors through the public constructors ----------------------------------------

FIELDS = ("qweight", "scales", "zeros", "act_scale", "group_size", "shape", "packing_format", "activations")


def _mutated(rng, fields: dict) -> tuple[str, dict]:
    """One field of a valid plain Int4AWQTensor's fields, changed at random."""
    fields = dict(fields)
    name = rng.choice(FIELDS)
    value = fields[name]
    if isinstance(value, torch.Tensor):
        how = rng.choice(["shape", "dtype", "values", "none", "device"] if name != "qweight" else ["shape", "dtype", "values"])
        if how == "shape":
            value = value.reshape(-1)[: rng.randrange(0, value.numel() + 1)] if rng.random() < 0.5 else \
                torch.cat([value.reshape(-1), value.reshape(-1)[:1]])
        elif how == "dtype":
            value = value.to(rng.choice([torch.float64, torch.int32, torch.int8, torch.float16, torch.bool]))
        elif how == "values":
            value = value.clone()
            flat = value.view(-1)
            i = rng.randrange(flat.numel())
            flat[i] = rng.choice([float("nan"), float("inf"), -float("inf"), 16, 255, -1, 0]) if \
                value.is_floating_point() else rng.choice([16, 200, 255, 0])
        elif how == "none":
            value = None
        else:
            value = value.to("meta")
    else:
        value = rng.choice([None, 0, -1, 7, 33, 2**40, 1.5, "x", [96], (96, 0), (-1, 96), (96, 96, 1), "triton",
                            "cpu_blocks", "plain", "int8", "int4", torch.Size((96, 95)), torch.Size((95, 96))])
    fields[name] = value
    return name, fields


@pytest.mark.filterwarnings("ignore:awqtensor. activations='int8' weights run weight-only")
@settings(max_examples=150, deadline=None, derandomize=True)
@given(rng=st.randoms(use_true_random=False))
def test_malformed_fields_are_refused_or_make_a_tensor_that_computes_what_it_stands_for(rng):
    import numpy as np
    import torch.nn.functional as F

    import reference
    from awqtensor import Int4AWQTensor

    valid = Int4AWQTensor.from_float(torch.randn(40, 96), 32, act_scale=torch.rand(96) + 0.5)
    fields = {"qweight": valid.plain_qweight(), "scales": valid.scales, "zeros": valid.zeros,
              "act_scale": valid.act_scale, "group_size": valid.group_size, "shape": valid.shape,
              "packing_format": "plain", "activations": None}
    name, fields = _mutated(rng, fields)
    for restore in (False, True):
        try:
            if restore:  # what torch.load(weights_only=True) does with a crafted pickle's state
                t = Int4AWQTensor.from_float(torch.randn(40, 96), 32)
                state = {k: v for k, v in fields.items() if k != "shape"}
                t.__setstate__(state)  # the shape is the wrapper's: [40, 96]
            else:
                t = Int4AWQTensor(**fields)
        except (ValueError, TypeError) as err:
            assert str(err), name
            continue
        x = torch.randn(3, t.shape[1])
        got = F.linear(x, t._repacked_for("cpu", torch.float32)).double()
        want = torch.from_numpy(x.double().numpy() @ reference.dequantize(t).T)
        assert torch.isfinite(got).all() == bool(np.isfinite(want.numpy()).all()), name
        assert (got - want).abs().max() <= 0.05 * want.abs().max() + 1e-6, name
