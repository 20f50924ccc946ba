import os
import zlib

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It is read
# when the kernels are defined (awqtensor.ops.triton_kernels is imported on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded(request):
    """torch seeds its global generator differently in every process: each test gets its
    own fixed seed instead, so a failure reproduces (inputs stay random, not constant)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to max |reference|: fp32 accumulates exactly enough; fp16/bf16 round the inputs.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    reference, actual = reference.double(), actual.double()
    return (10 * torch.log10(reference.pow(2).mean() / (reference - actual).pow(2).mean())).item()


def gpu_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
