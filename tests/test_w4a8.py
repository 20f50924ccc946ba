"""Issue 19's composition. W4A8 (``activations="int8"``): the format against an independent
float64 model of it (``reference.w4a8_linear``), the CPU GEMM's micro-kernels against each
other, the switch by M, serialization, compile, fusion, AWQ scoring with the format (the
Triton GEMM's test is in test_triton.py). AWQ over torchao's configs (``base_config=``)."""

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference
from awqtensor import Int4AWQTensor, awq_config, quantize_, rtn_config
from awqtensor.serialization import load_file, save_file
from awqtensor.ops import cpu_kernel, w4a8
from conftest import tiny_llama

pytestmark = pytest.mark.skipif(cpu_kernel.unavailable() is not None or not cpu_kernel.binding(),
                                reason="the W4A8 GEMM lives in the C++ CPU op")

CASES = [  # (N, M, K, group_size): N, M not multiples of 32, K not of the group; per channel
    (72, 37, 200, 32), (96, 50, 576, 64), (40, 33, 256, 128), (64, 17, 96, -1),
]


def w4a8_weight(n, k, group_size, zero_point=True, act_scale=True, dtype=torch.float32):
    w = (torch.randn(n, k) * 0.05 + 0.01 * torch.randn(n, 1)).to(dtype)
    act = (torch.rand(k) + 0.5).to(dtype) if act_scale else None
    return Int4AWQTensor.from_float(w, group_size, zero_point, act_scale=act, activations="int8")


@pytest.fixture
def route():
    old = w4a8.cpu_route(**w4a8._route)
    yield
    w4a8.cpu_route(**old)


def gemm_out(x, t, bias, kernel):
    w4a8.cpu_route(1, None, kernel)
    return F.linear(x, t, bias)


@pytest.mark.parametrize("n,m,k,group_size", CASES)
@pytest.mark.parametrize("zero_point", [True, False])
def test_cpu_gemm_matches_float64_model(route, n, m, k, group_size, zero_point):
    t = w4a8_weight(n, k, group_size, zero_point)
    x, bias = torch.randn(m, k) * 2, torch.randn(n)
    x[:, 3] *= 30  # an outlier channel: it coarsens its own group only
    expected = reference.w4a8_linear(x, t, bias)
    outputs = {kernel: gemm_out(x, t, bias, kernel) for kernel in w4a8.cpu_kernels()}
    for kernel, y in outputs.items():
        err = np.abs(y.double().numpy() - expected).max() / np.abs(expected).max()
        assert err < 2e-6, (kernel, err)
    # the micro-kernels are bit-identical (one rescale order, exact int32 dot products)
    first = next(iter(outputs.values()))
    for kernel, y in outputs.items():
        assert torch.equal(y, first), kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_gemm_half_dtypes(route, dtype):
    t = w4a8_weight(64, 192, 64, dtype=dtype)
    x = torch.randn(3, 20, 192).to(dtype)  # 3-D: M = numel / K = 60
    y = gemm_out(x, t, None, w4a8.cpu_kernels()[-1])
    assert y.shape == (3, 20, 64) and y.dtype == dtype
    expected = reference.w4a8_linear(x, t)
    err = np.abs(y.reshape(60, 64).double().numpy() - expected).max() / np.abs(expected).max()
    assert err < 1e-2


def test_w4a8_is_close_to_weight_only_and_coarser(route):
    """Per row and group int8 costs about 0.5% of the output, more than the decode
    kernel's per-32-column int8 and far less than int4 weights themselves."""
    w = torch.randn(128, 512) * 0.05
    x = torch.randn(64, 512)
    exact = x.double() @ w.double().T
    t = Int4AWQTensor.from_float(w, 128, activations="int8")
    w4a8_err = (gemm_out(x, t, None, None).double() - exact).norm() / exact.norm()
    w4_err = (x.double() @ t.dequantize().double().T - exact).norm() / exact.norm()
    assert w4a8_err < 1.2 * w4_err
    assert w4a8_err > w4_err  # the activations' rounding adds something


def test_switch_by_rows_not_shape(route):
    t = w4a8_weight(64, 128, 64)
    weight_only = t._replace(activations=None)
    w4a8.cpu_route(16, 128)
    assert w4a8.reasons(15, "cpu", 64, t.packing_format)["w4a8"].startswith("M=15 < 16")
    assert w4a8.reasons(16, "cpu", 64, t.packing_format)["w4a8"] is None
    assert "M=128 >= 128" in w4a8.reasons(128, "cpu", 64, t.packing_format)["w4a8"]
    for m, takes in [(15, False), (16, True), (127, True), (128, False)]:
        x = torch.randn(1, m, 128)  # batch 1: x.shape[1] is M only by accident, so also 2-D below
        for shaped in (x, x.reshape(m, 128)):
            y, y_wo = F.linear(shaped, t), F.linear(shaped, weight_only)
            assert torch.equal(y, y_wo) != takes, (m, shaped.shape)
    x = torch.randn(4, 8, 128)  # M = 32 rows in a 3-D input whose shape[1] is 8
    assert not torch.equal(F.linear(x, t), F.linear(x, weight_only))
    with pytest.raises(ValueError, match="positive int"):
        w4a8.cpu_route(0)
    with pytest.raises(ValueError, match="kernel must be"):
        w4a8.cpu_route(16, None, "tpu")


def test_disable_runs_weight_only(route, monkeypatch):
    t = w4a8_weight(64, 128, 64)
    w4a8.cpu_route(1)
    x = torch.randn(40, 128)
    for switch in ("cpu_w4a8", "w4a8"):  # the CPU's, and every device's
        monkeypatch.setenv("AWQTENSOR_DISABLE", switch)
        assert torch.equal(F.linear(x, t), F.linear(x, t._replace(activations=None)))
        assert w4a8.reasons(40, "cpu", 64, t.packing_format)["w4a8"] == "disabled by AWQTENSOR_DISABLE"


def test_layout_without_kernel_warns_once_and_runs_weight_only(monkeypatch):
    from awqtensor import packing

    t = w4a8_weight(32, 64, 32, act_scale=False)
    plain = t._replace(qweight=t.plain_qweight(), packing_format=packing.PLAIN)
    x = torch.randn(40, 64)
    monkeypatch.setattr(w4a8, "_warned", set())
    with pytest.warns(RuntimeWarning, match="run weight-only here"):
        y = F.linear(x, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.linear(x, plain)  # once
    assert torch.equal(y, F.linear(x, plain._replace(activations=None)))


def test_config_and_bad_values():
    assert rtn_config(64, activations="int8").activations == "int8"
    assert awq_config(64, activations="int8").activations == "int8"
    assert rtn_config(64).activations is None
    for bad in ("int4", "fp8", True):
        with pytest.raises(ValueError, match="activations must be None .* or 'int8'"):
            rtn_config(64, activations=bad)
        with pytest.raises(ValueError, match="activations must be"):
            awq_config(64, activations=bad)


def test_mode_survives_state_dict_safetensors_and_pickle(tmp_path):
    model = tiny_llama()
    quantize_(model, rtn_config(32, activations="int8"))
    x = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        expected = model(x).logits
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    weight = loaded["model.layers.0.self_attn.q_proj.weight"]
    assert weight.activations == "int8"
    torch.save(model.state_dict()["model.layers.0.mlp.up_proj.weight"], tmp_path / "w.pt")
    assert torch.load(tmp_path / "w.pt", weights_only=True).activations == "int8"
    fresh = tiny_llama()
    quantize_(fresh, rtn_config(32, activations="int8"))
    fresh.load_state_dict(loaded)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, expected)
    skeleton = tiny_llama()
    quantize_(skeleton, rtn_config(32))  # weight-only: the mode must agree
    with pytest.raises(RuntimeError, match="activations differs"):
        skeleton.load_state_dict(loaded)


def test_save_quantized_round_trip(tmp_path):
    from awqtensor import load_quantized, save_quantized

    model = tiny_llama()
    quantize_(model, rtn_config(32, activations="int8"))
    save_quantized(model, tmp_path / "m")
    loaded = load_quantized(tmp_path / "m")
    assert loaded.model.layers[1].mlp.down_proj.weight.activations == "int8"
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_compile_keeps_one_w4a8_op_per_matmul():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model = tiny_llama()
    quantize_(model, rtn_config(32, activations="int8"))
    graphs = []

    def forward_compiler(gm, inputs):  # the graph after the tensor subclass is desugared
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    x = torch.randint(0, 320, (1, 20))
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=forward_compiler), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if "awqtensor" in str(n.target)]
    assert sum("w4a8_linear" in op for op in ops) == 14 and len(ops) == 14, ops


def test_awq_scores_with_int8_activations(monkeypatch):
    """With activations="int8" every search scores through the activation quantization
    (calls counted), and the model it gives runs W4A8 and stays close to float."""
    calls = []
    original = w4a8.fake_quantize_activations
    monkeypatch.setattr(w4a8, "fake_quantize_activations", lambda x, g: calls.append(1) or original(x, g))
    data = torch.randint(0, 320, (8, 32))
    plain = tiny_llama()
    quantize_(plain, awq_config(32, n_samples=8, seq_len=32, n_grid=4), calibration_data=data)
    assert not calls
    model = tiny_llama()
    quantize_(model, awq_config(32, n_samples=8, seq_len=32, n_grid=4, activations="int8"), calibration_data=data)
    assert len(calls) > 20
    assert model.model.layers[0].self_attn.o_proj.weight.activations == "int8"
    x = torch.randint(0, 320, (1, 48))
    with torch.no_grad():
        reference_logits = tiny_llama()(x).logits
        err = (model(x).logits - reference_logits).norm() / reference_logits.norm()
    assert err < 0.2


# ---- AWQ over torchao's own configs (awq_config(base_config=...)) ----

def _torchao_configs():
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup

    return [tq.Int8WeightOnlyConfig(), tq.Int8DynamicActivationInt8WeightConfig(),
            tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["int8-weight-only", "int8-dynamic", "int4-weight-only"])
def test_awq_over_torchao_config(index):
    """Scored with the config's own quantization, folded, converted by torchao's handler:
    the Linears hold torchao's tensor, scales were chosen and folded into the norms, and
    the output error on held-out tokens stays near the config alone's (a random tiny
    model says nothing of quality: SmolLM2's perplexity rows do, benchmarks/perplexity.py)."""
    import torchao

    base = _torchao_configs()[index]
    data, held = torch.randint(0, 320, (8, 32)), torch.randint(0, 320, (4, 48))
    with torch.no_grad():
        reference_logits = tiny_llama()(held).logits
    plain = tiny_llama()
    torchao.quantization.quantize_(plain.model, base)
    model = tiny_llama()
    with pytest.warns(UserWarning, match="keep AWQ scale 1 under") as caught:  # GQA: o_proj cannot fold
        quantize_(model, awq_config(32, n_samples=8, seq_len=32, n_grid=8, base_config=base), calibration_data=data)
    assert sum("keep AWQ scale 1" in str(w.message) for w in caught) == 1
    for linear in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
        assert type(linear.weight) is type(plain.model.layers[0].self_attn.q_proj.weight)
    assert not isinstance(model.lm_head.weight, Int4AWQTensor)
    with torch.no_grad():
        err_plain = (plain(held).logits - reference_logits).norm() / reference_logits.norm()
        err_awq = (model(held).logits - reference_logits).norm() / reference_logits.norm()
    assert err_awq <= 1.25 * err_plain, (err_awq, err_plain)
    folded = [not torch.equal(a.input_layernorm.weight, b.input_layernorm.weight)
              for a, b in zip(model.model.layers, plain.model.layers)]
    assert any(folded)


def test_base_config_bad_input():
    import torchao.quantization as tq
    from torchao.core.config import AOBaseConfig
    from torchao.quantization.granularity import PerGroup

    with pytest.raises(TypeError, match="base_config must be a torchao AOBaseConfig"):
        awq_config(64, base_config="int8")
    with pytest.raises(ValueError, match="leave base_config out"):
        awq_config(64, base_config=rtn_config(64))
    with pytest.raises(ValueError, match="no per-module handler"):
        awq_config(64, base_config=tq.FqnToConfig({}))

    class Unregistered(AOBaseConfig):
        pass

    with pytest.raises(ValueError, match="no per-module handler for Unregistered"):
        awq_config(64, base_config=Unregistered())
    with pytest.raises(ValueError, match="activations= belongs"):
        awq_config(64, activations="int8", base_config=tq.Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match="one call"):
        awq_config(64, step="prepare", base_config=tq.Int8WeightOnlyConfig())
    # a config that cannot take a shape: named, before anything is converted
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    bad = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))  # 96 % 64 != 0
    with pytest.raises(ValueError, match=r"cannot quantize model\.layers\.0\.self_attn\.q_proj \(\[96, 96\]"):
        quantize_(model, awq_config(32, n_samples=2, seq_len=16, base_config=bad),
                  calibration_data=torch.randint(0, 320, (2, 16)))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fqn_mix_of_ours_and_torchao():
    import torchao
    import torchao.quantization as tq

    model = tiny_llama()
    mix = tq.FqnToConfig({"model.layers.0.mlp.up_proj": rtn_config(32, activations="int8"),
                          "model.layers.1.mlp.up_proj": tq.Int8WeightOnlyConfig()})
    torchao.quantization.quantize_(model, mix, filter_fn=None)
    assert model.model.layers[0].mlp.up_proj.weight.activations == "int8"
    assert type(model.model.layers[1].mlp.up_proj.weight).__name__ == "Int8Tensor"
    with torch.no_grad():
        model(torch.randint(0, 320, (1, 20)))


def test_fuse_keeps_the_mode_and_autoawq_export_warns(tmp_path):
    from awqtensor import fuse_, load_autoawq, save_autoawq

    model = tiny_llama()
    quantize_(model, rtn_config(32, activations="int8"))
    x = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        expected = model(x).logits
    fuse_(model)
    fused = [m for n, m in model.named_modules() if n.endswith("qkv_proj") or n.endswith("gate_up_proj")]
    assert fused and all(m.weight.activations == "int8" for m in fused)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    plain = tiny_llama()
    quantize_(plain, rtn_config(32, activations="int8"))
    with pytest.warns(UserWarning, match="AutoAWQ's format is weight-only"):
        save_autoawq(plain, tmp_path / "a")
    loaded = load_autoawq(tmp_path / "a")
    assert loaded.model.layers[0].mlp.up_proj.weight.activations is None


# ---- the GEMM on ARM64 (NEON dotprod) under qemu: cross-compiled, against the x86 op ----

CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
GEMM_DRIVER = Path(__file__).with_name("cpu_gemm_driver.cpp")


@pytest.fixture(scope="module")
def arm64_gemm(tmp_path_factory):
    if not (CROSS and QEMU):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (.ci/run installs them)")
    exe = tmp_path_factory.mktemp("arm64") / "gemm"
    subprocess.run([CROSS, "-O2", "-static", "-std=c++17", "-ffp-contract=off", "-I", str(cpu_kernel.SOURCE.parent),
                    str(GEMM_DRIVER), "-o", str(exe)], check=True, capture_output=True)
    return exe


@pytest.mark.parametrize("kernel", ["neon_dotprod", "scalar"])
def test_arm64_gemm_under_qemu_is_bit_identical_to_x86(route, arm64_gemm, kernel):
    for n, m, k, group_size in CASES[:3]:
        t = w4a8_weight(n, k, group_size, act_scale=False)
        x, bias = torch.randn(m, k) * 2, torch.randn(n)
        header = np.array([m, k, n, t.scales.shape[1], t.group_size, w4a8.CPU_KERNELS.index(kernel), 1], dtype=np.int64)
        payload = header.tobytes() + x.numpy().tobytes() + t.qweight.contiguous().numpy().tobytes() + bias.numpy().tobytes()
        run = subprocess.run([QEMU, str(arm64_gemm)], input=payload, capture_output=True, check=True)
        y_arm = torch.frombuffer(bytearray(run.stdout), dtype=torch.float32).reshape(m, n)
        assert torch.equal(y_arm, gemm_out(x, t, bias, w4a8.cpu_kernels()[-1])), (n, m, k, group_size)
