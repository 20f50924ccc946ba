"""State kept between calls: the decode steps generate keeps per model, the compiled-kernel
cache, the Triton tuning cache and the demo model's conversion."""

import os
import stat
import warnings

import pytest
import torch
from torch import nn

from awqtensor import Int4AWQTensor, fast_generate_, fuse_, generate, quantize_, quantize_head_, rtn_config
from awqtensor import generation, native
from conftest import tiny_llama


def quantized_llama(seed=0):
    # initializer_range: at the default 0.02 a tied random model repeats one token whatever its weights
    model = tiny_llama(seed, tie_word_embeddings=True, initializer_range=0.2)
    quantize_(model, rtn_config(group_size=32))
    fuse_(model)
    quantize_head_(model)
    return model


def reference(model, ids, n):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, disable_compile=True)


def _assign(model):
    model.load_state_dict(quantized_llama(seed=1).state_dict(), assign=True)


def _reassign(model):
    g = torch.Generator().manual_seed(5)
    model.model.layers[0].mlp.down_proj.weight = nn.Parameter(
        Int4AWQTensor.from_float(torch.randn(96, 160, generator=g), 32), requires_grad=False)


def _hook(model):
    model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 6 + 0.5)


def _dtype(model):
    model.to(torch.bfloat16)


@pytest.mark.parametrize("change", [_assign, _reassign, _hook, _dtype], ids=["assign", "reassign", "hook", "dtype"])
def test_generate_rebuilds_its_step_after_the_model_changes(monkeypatch, change):
    model = quantized_llama()
    ids = torch.randint(3, 320, (1, 6))
    plans = []
    monkeypatch.setattr(native, "plan", lambda *a, plan=native.plan: plans.append(plan(*a)) or plans[-1])
    before = generate(model, ids, 10, compile=False)
    assert torch.equal(generate(model, ids, 10, compile=False), before)  # unchanged: the kept step serves
    assert len(plans) == (0 if native.unsupported(model, 256) else 1)
    change(model)
    out = generate(model, ids, 10, compile=False)
    assert torch.equal(out, reference(model, ids, 10))
    if change is _dtype:  # bf16 picks the same tokens here; the C++ step (fp32 only) must be gone
        assert all(v is None for k, v in generation._steps[model].items() if k[0] == "native")
    else:  # the change matters, so a stale step would show
        assert not torch.equal(out, before)


def test_in_place_loading_keeps_the_step():
    """load_state_dict without assign copies into the tensors the kept step reads."""
    model = quantized_llama()
    ids = torch.randint(3, 320, (1, 6))
    before = generate(model, ids, 10, compile=False)
    kept = dict(generation._steps[model])
    model.load_state_dict(quantized_llama(seed=1).state_dict())
    out = generate(model, ids, 10, compile=False)
    assert generation._steps[model] == kept
    assert torch.equal(out, reference(model, ids, 10)) and not torch.equal(out, before)



def test_transformers_generate_rebuilds_its_forward_after_a_hook(monkeypatch):
    """fast_generate_'s compiled forward skips the guards on modules: a hook registered
    after it was built must make a new one (built eagerly here: compiling takes ~20 s)."""
    built = []
    monkeypatch.setattr(generation, "_compiled", lambda fn, model, *a, **k: built.append(fn) or fn)
    model = quantized_llama()
    ids = torch.randint(3, 320, (1, 6))
    fast_generate_(model)
    run = lambda: model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)  # noqa: E731
    before = run()
    assert torch.equal(run(), before) and len(built) == 1
    _hook(model)
    out = run()
    assert len(built) == 2
    assert torch.equal(out, reference(model, ids, 10)) and not torch.equal(out, before)


# --- the compiled-kernel cache: a library is code, loaded only from a private cache -----------

@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    from awqtensor.ops import cpu_kernel

    if cpu_kernel._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("AWQTENSOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_kernel_cache_is_private_and_refuses_what_others_could_write(kernel_cache, monkeypatch):
    from awqtensor.ops import cpu_kernel

    library = cpu_kernel._build(cpu_kernel._compiler())  # the plain build: about a second
    assert library.is_relative_to(kernel_cache)
    for path in (kernel_cache, kernel_cache / "cpu_kernel", library.parent, library):
        assert _mode(path) == 0o700, path
    assert cpu_kernel._build(cpu_kernel._compiler()) == library  # trusted: reused
    for path in (library, library.parent, kernel_cache / "cpu_kernel", kernel_cache):
        os.chmod(path, 0o777 if path.is_dir() else 0o666)
        with pytest.raises(cpu_kernel.UntrustedCache, match=f"{path} is writable by group or others .*chmod go-w"):
            cpu_kernel._build(cpu_kernel._compiler())
        os.chmod(path, 0o700)
    os.chmod(library, 0o620)  # group-writable alone is refused too
    with pytest.raises(cpu_kernel.UntrustedCache, match="mode 620"):
        cpu_kernel._build(cpu_kernel._compiler())
    os.chmod(library, 0o700)
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # as if another user had made the cache
    with pytest.raises(cpu_kernel.UntrustedCache, match=f"owned by uid {uid}, not by you .*AWQTENSOR_CACHE"):
        cpu_kernel._build(cpu_kernel._compiler())


def test_untrusted_kernel_cache_falls_back_with_one_warning(kernel_cache, monkeypatch):
    from awqtensor.ops import cpu_kernel

    kernel_cache.mkdir()
    os.chmod(kernel_cache, 0o777)
    monkeypatch.setattr(cpu_kernel, "_binding_loaded", [])  # as in a fresh process
    cpu_kernel._load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = Int4AWQTensor.from_float(torch.randn(16, 64), 32)
            b = Int4AWQTensor.from_float(torch.randn(16, 64), 32)
        ours = [str(w.message) for w in caught if "cache is refused" in str(w.message)]
        assert len(ours) == 1 and "chmod go-w" in ours[0] and "torch's slower int4 kernel" in ours[0], ours
        assert a.packing_format == b.packing_format == "cpu_int4pack"
        assert not any(kernel_cache.iterdir())  # nothing was built or loaded there
    finally:
        monkeypatch.undo()
        cpu_kernel._load.cache_clear()


def test_tuning_cache_ignores_a_file_others_could_write(tmp_path, monkeypatch):
    from awqtensor.ops import tuning

    path = tmp_path / "triton" / "dev.json"
    monkeypatch.setattr(tuning, "cache_path", lambda device: path)
    tuning._cache.cache_clear()
    try:
        value = int(torch.randint(2, 64, ()))
        tuning.set_thresholds("cpu", gemv_max_m=value)
        assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
        assert [p.name for p in path.parent.iterdir()] == ["dev.json"]  # no temporary file left
        tuning._cache.cache_clear()
        assert tuning.thresholds("cpu")["gemv_max_m"] == value
        os.chmod(path, 0o666)
        tuning._cache.cache_clear()
        assert tuning.thresholds("cpu") == tuning.DEFAULT_THRESHOLDS
    finally:
        tuning._cache.cache_clear()


# --- the demo model's conversion: a temporary folder of its own, renamed into place -----------

def _fake_conversion(monkeypatch, cache, during_save=None):
    """smollm2.model_dir with transformers' GGUF loading replaced by stand-ins that write the
    two files it checks for; returns the folders they wrote to."""
    import types

    import transformers

    from awqtensor import smollm2

    written = []

    class Saved:
        def __init__(self, name):
            self.name = name
            self.hf_quantizer = object()
            self.config = types.SimpleNamespace(quantization_config={})

        def save_pretrained(self, folder):
            written.append(folder)
            if during_save is not None:
                during_save()
            (folder / self.name).write_text(f"ours {os.getpid()}")

    monkeypatch.setenv("AWQTENSOR_CACHE", str(cache))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: cache / "model.gguf")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: Saved("model.safetensors"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saved("tokenizer.json"))
    return smollm2, written


def test_demo_conversion_uses_a_folder_of_its_own(tmp_path, monkeypatch):
    smollm2, written = _fake_conversion(monkeypatch, tmp_path)
    target = smollm2.model_dir()
    assert target == tmp_path / "SmolLM2-135M-Instruct" and smollm2._complete(target)
    assert written[0] != target and written[0].parent == tmp_path and written[0].name.endswith(".partial")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct"]  # nothing left behind
    assert smollm2.model_dir() == target and len(written) == 2  # converted once


def test_demo_conversion_keeps_the_folder_of_a_process_that_finished_first(tmp_path, monkeypatch):
    target = tmp_path / "SmolLM2-135M-Instruct"

    def other_process_finishes():
        if not target.exists():
            target.mkdir()
            (target / "model.safetensors").write_text("theirs")
            (target / "tokenizer.json").write_text("theirs")

    smollm2, written = _fake_conversion(monkeypatch, tmp_path, other_process_finishes)
    assert smollm2.model_dir() == target
    assert (target / "model.safetensors").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct"]


def test_demo_conversion_replaces_an_incomplete_folder(tmp_path, monkeypatch):
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    (target / "model.safetensors").write_text("half")  # a crash before the tokenizer
    smollm2, written = _fake_conversion(monkeypatch, tmp_path)
    assert smollm2.model_dir() == target and (target / "tokenizer.json").read_text().startswith("ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct"]
