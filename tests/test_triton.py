"""The Triton kernels (``awqtensor.ops.triton_kernels``) against an independent float64
reference: natively on a GPU, in Triton's interpreter on CPU tensors otherwise
(``AWQTENSOR_BACKEND=triton``, ``TRITON_INTERPRET=1`` from conftest). Small shapes: the
interpreter runs each program in numpy."""

import json
import os

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import reference
from awqtensor import Int4AWQTensor, packing
from conftest import max_rel_err
from test_ops import make_weight

pytest.importorskip("triton")

from awqtensor.ops import gpu, triton_kernels, tuning  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
N, K = 40, 200  # N not a multiple of BLOCK_N, K not a multiple of any group size (padded)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch, tmp_path):
    monkeypatch.setenv("AWQTENSOR_BACKEND", "triton")
    monkeypatch.setenv("AWQTENSOR_CACHE", str(tmp_path))
    monkeypatch.delenv("AWQTENSOR_DISABLE", raising=False)
    # Thresholds under which M picks each kernel in turn, so every route is tested (the
    # shipped defaults, measured on an H200, send every M > 1 to dequantize_matmul).
    monkeypatch.setattr(tuning, "DEFAULT_THRESHOLDS", {"gemv_max_m": 16, "gemm_max_m": 1024})
    tuning._cache.cache_clear()
    yield
    tuning._cache.cache_clear()


def triton_weight(n, k, dtype, group_size, zero_point=True, act_scale=False, seed=0):
    t = make_weight(n, k, dtype, group_size, zero_point, act_scale, seed=seed).to(DEVICE)
    assert t.packing_format == packing.TRITON, t
    return t


def ref_linear(x, t, bias=None):
    return reference.linear(x.cpu(), t, None if bias is None else bias.cpu())


@pytest.mark.parametrize("m", [1, 15, 16, 17, 127, 128, 129])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_linear_matches_float64_reference(m, group_size):
    dtype = torch.float16 if (m + group_size) % 2 else torch.bfloat16
    t = triton_weight(N, K, dtype, group_size, act_scale=m % 2 == 1, seed=m + group_size)
    x = torch.randn(m, K, dtype=dtype, device=DEVICE)
    bias = torch.randn(N, dtype=dtype, device=DEVICE)
    assert gpu.choose(m, x.device) == ("gemv" if m <= 16 else "gemm")
    y = F.linear(x, t, bias)
    assert y.dtype == dtype and y.shape == (m, N)
    assert max_rel_err(y.cpu(), ref_linear(x, t, bias)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero_point,act_scale", [(True, False), (False, True)])
def test_each_kernel(dtype, zero_point, act_scale):
    t = triton_weight(72, 160, dtype, 32, zero_point, act_scale, seed=3)
    x = torch.randn(20, 160, dtype=dtype, device=DEVICE)
    bias = torch.randn(72, dtype=dtype, device=DEVICE)
    expected = ref_linear(x, t, bias)
    args = (t.qweight, t.scales, t.zeros, t.act_scale, bias, t.group_size)
    for split_k in (1, 3):  # 3 does not divide the 5 K tiles
        y = triton_kernels.gemv(x, *args, block_n=32, block_k=32, split_k=split_k)
        assert max_rel_err(y.cpu(), expected) < TOL[dtype]
    for block_m in (16, 32):
        y = triton_kernels.gemm(x, *args, block_m=block_m, block_n=64, block_k=32)
        assert max_rel_err(y.cpu(), expected) < TOL[dtype]
    w = triton_kernels.dequantize(t.qweight, t.scales, t.zeros, t.act_scale, 32, 160, dtype)
    assert max_rel_err(w.cpu(), torch.from_numpy(reference.dequantize(t))) < TOL[dtype]


def test_dequantize_matmul_route(monkeypatch):
    monkeypatch.setenv("AWQTENSOR_DISABLE", "gemv,gemm")
    assert gpu.reasons(4, torch.device(DEVICE))["gemv"] == "disabled by AWQTENSOR_DISABLE=gemv"
    assert gpu.choose(4, torch.device(DEVICE)) == "dequantize_matmul"
    t = triton_weight(N, K, torch.float16, 64, act_scale=True, seed=5)
    x = torch.randn(2, 3, K, dtype=torch.float16, device=DEVICE)
    y = F.linear(x, t)
    assert y.shape == (2, 3, N)
    assert max_rel_err(y.reshape(6, N).cpu(), ref_linear(x.reshape(6, K), t)) < TOL[torch.float16]


def test_rows_are_batch_invariant_within_a_kernel():
    t = triton_weight(N, K, torch.float16, 64, seed=7)
    x = torch.randn(64, K, dtype=torch.float16, device=DEVICE)
    gemv_rows = F.linear(x[:15], t)
    for i in (0, 7, 14):
        assert torch.equal(F.linear(x[i : i + 1], t)[0], gemv_rows[i])
    full = F.linear(x, t)  # 33..64 rows share one tile shape
    assert torch.equal(F.linear(x[:33], t), full[:33])
    assert max_rel_err(gemv_rows.cpu(), full[:15].double().cpu()) < TOL[torch.float16]


def test_layout_round_trip_and_back_to_cpu(monkeypatch):
    t = triton_weight(N, K, torch.bfloat16, 32, seed=9)
    assert t.qweight.dtype == torch.int32 and t.qweight.shape == (t.k_padded // 8, N)
    plain = t.plain_qweight()
    assert torch.equal(packing.repack(plain, t.k_padded, packing.PLAIN, packing.TRITON), t.qweight)
    monkeypatch.delenv("AWQTENSOR_BACKEND")
    back = t.to("cpu", torch.float32)
    assert back.packing_format != packing.TRITON
    torch.testing.assert_close(back.dequantize(), t.dequantize().cpu().float(), rtol=1e-2, atol=1e-3)
    restored = Int4AWQTensor.from_float(torch.randn(16, 64), 32).to(DEVICE, torch.float16)
    monkeypatch.setenv("AWQTENSOR_BACKEND", "triton")
    assert restored.to(DEVICE, torch.bfloat16).packing_format == packing.TRITON


def test_opcheck():
    t = triton_weight(32, 96, torch.float16, 32, act_scale=True, seed=1)
    x = torch.randn(2, 3, 96, dtype=torch.float16, device=DEVICE)
    bias = torch.randn(32, dtype=torch.float16, device=DEVICE)
    torch.library.opcheck(torch.ops.awqtensor.int4_linear.default,
                          (x, t.qweight, t.scales, t.zeros, t.act_scale, bias, t.group_size, t.packing_format))
    torch.library.opcheck(torch.ops.awqtensor.dequantize.default,
                          (t.qweight, t.scales, t.zeros, t.act_scale, t.group_size, 96, t.packing_format))


def test_tuning_cache_is_read_and_corrupt_files_are_ignored(caplog):
    device = torch.device(DEVICE)
    assert tuning.thresholds(device) == tuning.DEFAULT_THRESHOLDS
    path = tuning.set_thresholds(device, gemv_max_m=4)
    assert json.loads(path.read_text())["thresholds"]["gemv_max_m"] == 4
    assert gpu.choose(5, device) == "gemm" and gpu.choose(4, device) == "gemv"
    key = "gemv|8|40|200|64|float16"
    data = json.loads(path.read_text())
    data["configs"][key] = {"block_n": 16, "block_k": 32, "split_k": 2}
    path.write_text(json.dumps(data))
    tuning._cache.cache_clear()
    assert tuning.config("gemv", 5, 40, 200, 64, torch.float16, device) == data["configs"][key]
    assert tuning.config("gemv", 5, 40, 256, 64, torch.float16, device) == tuning.default_config("gemv", 5, 40, 256)
    path.write_text("{not json")
    tuning._cache.cache_clear()
    assert tuning.thresholds(device) == tuning.DEFAULT_THRESHOLDS
    assert "ignoring the unreadable tuning cache" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full benchmark is for a GPU session")
def test_kernel_benchmark_script_runs_under_the_interpreter(tmp_path):
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_kernels.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"})
    rows = list(csv.DictReader(next(tmp_path.glob("gpu_kernels_*.csv")).open()))
    assert {"M", "speedup", "ms", "GB/s", "TFLOP/s"} <= set(rows[0])
    assert {int(r["M"]) for r in rows} == {1, 16, 17}
    assert {r["chosen"] for r in rows if "auto" in r["method"]} == {"gemv", "dequantize_matmul"}  # the defaults


def test_fused_model_on_the_triton_kernels():
    from awqtensor import fuse_, quantize_, rtn_config
    from conftest import tiny_llama

    model = tiny_llama(seed=3).to(DEVICE, torch.float16)
    quantize_(model, rtn_config(group_size=32))
    assert model.model.layers[0].mlp.up_proj.weight.packing_format == packing.TRITON
    ids = torch.randint(0, 320, (1, 4), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        expected = model(ids).logits
        fuse_(model)
        assert model.model.layers[0].self_attn.qkv_proj.weight.packing_format == packing.TRITON
        assert max_rel_err(model(ids).logits, expected) < TOL[torch.float16]


def test_mixture_of_experts_on_the_triton_kernels(tmp_path):
    """Each routed expert's Linears run the Triton kernels on its own tokens; the model
    matches the same model with every weight dequantized to a plain float matmul."""
    import copy

    from awqtensor import Int4AWQTensor, quantize_, rtn_config
    from awqtensor.moe import RoutedExperts
    from families import build

    model = build("qwen3-moe", seed=2).to(DEVICE, torch.float16)
    quantize_(model, rtn_config(group_size=32))
    experts = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    assert experts[1].down_proj.weight.packing_format == packing.TRITON
    storage = lambda t: t.qweight.untyped_storage().data_ptr()  # noqa: E731
    dense = copy.deepcopy(model)
    for module in dense.modules():
        if isinstance(module, nn.Linear) and isinstance(module.weight, Int4AWQTensor):
            module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        assert max_rel_err(model(ids).logits, dense(ids).logits) < TOL[torch.float16]
    # One grouped launch per projection: every expert's weight now views one stacked tensor.
    assert experts._stacked is not None
    assert storage(experts[0].up_proj.weight) == storage(experts[3].up_proj.weight)
    # A model whose experts view a stack saves and loads back the same weights.
    from awqtensor import load_quantized, save_quantized

    save_quantized(model.to("cpu") if DEVICE == "cuda" else model, tmp_path / "moe")
    loaded = dict(load_quantized(tmp_path / "moe", dtype=torch.float16).named_parameters())
    for name, p in model.named_parameters():
        if isinstance(p, Int4AWQTensor):
            assert torch.equal(loaded[name].dequantize().cpu(), p.dequantize().cpu()), name


def _stacked(weights, field):
    values = [getattr(w, field) for w in weights]
    return None if values[0] is None else torch.stack(values)


@pytest.mark.parametrize("tokens", [1, 9, 23])  # tiles of 16 positions: one, straddled, several per expert
@pytest.mark.parametrize("zero_point,act_scale", [(True, True), (False, False)])
def test_grouped_moe_kernel_matches_float64_reference(tokens, zero_point, act_scale):
    from awqtensor.ops import triton_moe

    experts = [triton_weight(N, K, torch.float16, 32, zero_point, act_scale, seed=e) for e in range(3)]
    g = torch.Generator().manual_seed(tokens)
    top_k = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(tokens)]).to(DEVICE)
    x = torch.randn(tokens, K, generator=g).to(DEVICE, torch.float16)
    rows, block_experts, pairs = triton_moe.routing(top_k, 3)
    args = (x, rows, block_experts, *(_stacked(experts, f) for f in ("qweight", "scales", "zeros", "act_scale")), 32)
    y = torch.ops.awqtensor.int4_grouped_linear(*args)
    used = rows >= 0
    assert sorted(pairs[used].tolist()) == list(range(2 * tokens))  # every (token, slot) once
    for p in used.nonzero().flatten().tolist():
        token, slot = divmod(pairs[p].item(), 2)
        expert = top_k[token, slot].item()
        assert block_experts[p // triton_moe.BLOCK_M] == expert and rows[p] == token
        expected = reference.linear(x[token:token + 1].cpu(), experts[expert])
        assert max_rel_err(y[p:p + 1].cpu(), expected) < TOL[torch.float16], (p, expert)
    torch.library.opcheck(torch.ops.awqtensor.int4_grouped_linear.default, args)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("zero_point", [True, False])
def test_w4a8_gemm_against_float64(group_size, zero_point):
    """The Triton W4A8 GEMM (int8 tiles through tl.dot) against the float64 model of the
    format, through F.linear: M = 70 rows (>= the switch's CUDA_MIN_M, not a multiple of
    BLOCK_M), N = 40, K = 200 (padded in the last group), act_scale and bias."""
    from awqtensor.ops import w4a8

    from awqtensor.ops import gpu

    t = triton_weight(N, K, torch.float32, group_size, zero_point, act_scale=True)._replace(activations="int8")
    x = torch.randn(2, 35, K, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    if DEVICE == "cpu":  # the interpreter: the switch sends M=70 to the W4A8 GEMM
        assert w4a8.reasons(70, x.device, group_size, t.packing_format)["w4a8"] is None
        y = F.linear(x, t, bias)
    else:  # a GPU: the switch keeps it off (measured slow), so call it directly
        assert "measured slower" in w4a8.reasons(70, x.device, group_size, t.packing_format)["w4a8"]
        y = gpu.w4a8_linear(x, t.qweight, t.scales, t.zeros, t.act_scale, bias, group_size)
    expected = reference.w4a8_linear(x.cpu(), t.cpu(), bias.cpu())
    assert max_rel_err(y.reshape(70, N).cpu(), torch.from_numpy(expected)) < 2e-6
    # below the switch's threshold the same weight runs weight-only
    small = torch.randn(3, K, device=DEVICE)
    assert "M=3 <" in w4a8.reasons(3, x.device, group_size, t.packing_format)["w4a8"]
    torch.testing.assert_close(F.linear(small, t), F.linear(small, t._replace(activations=None)), rtol=0, atol=0)
