"""vLLM (its CPU build, in its own environment) serves awqtensor's AutoAWQ export of SmolLM2
and computes what awqtensor computes. Skipped unless AWQTENSOR_VLLM_PYTHON names the Python
of an environment with vLLM (install: benchmarks/vllm_check.py's docstring); vLLM pins its
own torch and transformers, so it cannot share this one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("AWQTENSOR_VLLM_PYTHON")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not VLLM_PYTHON or subprocess.run([VLLM_PYTHON, "-c", "import vllm"], capture_output=True).returncode != 0,
    reason="no vLLM environment (set AWQTENSOR_VLLM_PYTHON)")]


def test_vllm_serves_the_autoawq_export():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vllm_check

    data = ROOT.parent / "shared" / "data"
    (row,) = vllm_check.check(VLLM_PYTHON, ["rtn"], 64, max_tokens=8, batches=[], speed_tokens=0, prompt_tokens=24,
                              eval_text=data / "enwiki_clean.txt", calib_text=data / "lee.txt", n_sequences=2,
                              modes=["w4a16"])
    assert row["vllm_kernel"] != "?"  # vLLM's int4 kernel served it (not a float fallback)
    # vLLM computes in bf16, awqtensor in fp32: teacher-forced log-probabilities agree to bf16 noise
    assert row["mean_logprob_diff"] < 0.05 and row["max_logprob_diff"] < 0.5
    assert abs(row["nll_vllm"] / row["nll_awqtensor"] - 1) < 0.01
