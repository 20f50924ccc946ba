"""Int4AWQTensor and Int8HeadTensor refuse bad fields where they are made (the constructor),
restored (torch.load(weights_only=True) of a crafted file) and loaded into (load_state_dict),
with an error that names the field; the 8-bit embedding refuses out-of-range ids."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from awqtensor import Int4AWQTensor, Int8HeadTensor, packing
from awqtensor import tensor as tensor_module

N, K, GROUP = 48, 200, 64  # K not a multiple of the group: 4 groups, the last one 8 columns wide


def good_fields(dtype=torch.float32, seed=0) -> dict:
    """The fields of a valid Int4AWQTensor in the "plain" layout (with zeros and act_scale)."""
    g = torch.Generator().manual_seed(seed)
    act_scale = (torch.rand(K, generator=g) + 0.5).to(dtype)
    t = Int4AWQTensor.from_float((torch.randn(N, K, generator=g) * 0.1).to(dtype), GROUP, act_scale=act_scale)
    return dict(qweight=t.plain_qweight(), scales=t.scales, group_size=GROUP, shape=t.shape,
                packing_format=packing.PLAIN, zeros=t.zeros, act_scale=t.act_scale, activations=None)


def _poked(t: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``t`` with ``value`` at one random position."""
    out = t.clone()
    out.view(-1)[torch.randint(0, out.numel(), ())] = value
    return out


# (field, bad value made from the good fields, error, message): a few per field
BAD = [
    ("qweight", lambda f: f["qweight"].to(torch.int16), TypeError, "qweight must be torch.uint8"),
    ("qweight", lambda f: f["qweight"][:, 1:], ValueError, r"qweight must have shape \[48, 128\]"),
    ("qweight", lambda f: f["qweight"].float(), TypeError, "qweight must be torch.uint8"),
    ("scales", lambda f: f["scales"].double(), TypeError, "scales must be floating"),
    ("scales", lambda f: f["scales"].to(torch.int32), TypeError, "scales must be floating"),
    ("scales", lambda f: f["scales"][:, :3], ValueError, r"scales must have shape \[48, 4\].*got \[48, 3\]"),
    ("scales", lambda f: f["scales"][0], ValueError, "scales must have shape"),
    ("scales", lambda f: _poked(f["scales"], float("nan")), ValueError, "scales must be finite"),
    ("scales", lambda f: _poked(f["scales"], float("-inf")), ValueError, "scales must be finite"),
    ("group_size", lambda f: 0, ValueError, "group_size must be a positive int, got 0"),
    ("group_size", lambda f: -1, ValueError, "group_size must be a positive int"),
    ("group_size", lambda f: 64.0, ValueError, "group_size must be a positive int"),
    ("group_size", lambda f: 32, ValueError, r"scales must have shape \[48, 7\].*group_size 32"),
    ("group_size", lambda f: 67, ValueError, r"scales must have shape \[48, 3\]"),  # a 4th group would be empty
    ("packing_format", lambda f: "nibbles", ValueError, "packing_format must be one of"),
    ("packing_format", lambda f: packing.CPU_BLOCKS, ValueError, "qweight must have shape .*'cpu_blocks'"),
    ("packing_format", lambda f: packing.TRITON, TypeError, "qweight must be torch.int32 in packing_format 'triton'"),
    ("zeros", lambda f: f["zeros"].long(), TypeError, "zeros must be torch.uint8"),
    ("zeros", lambda f: f["zeros"][:-1], ValueError, r"zeros must have shape \[48, 4\]"),
    ("zeros", lambda f: _poked(f["zeros"], 16 + int(torch.randint(0, 200, ()))), ValueError,
     r"zeros must hold zero points 0\.\.15"),
    ("act_scale", lambda f: f["act_scale"].double(), TypeError, "act_scale must be torch.float32"),
    ("act_scale", lambda f: f["act_scale"][1:], ValueError, r"act_scale must have shape \[200\]"),
    ("act_scale", lambda f: f["act_scale"][None], ValueError, "act_scale must have shape"),
    ("act_scale", lambda f: _poked(f["act_scale"], float("inf")), ValueError, "act_scale must be finite"),
    ("activations", lambda f: "int4", ValueError, "activations must be None"),
    ("scales", lambda f: f["scales"].to("meta"), ValueError, "one device.*scales on meta"),
]
IDS = [f"{field}-{i}" for i, (field, *_) in enumerate(BAD)]


@pytest.mark.parametrize("field, bad, error, match", BAD, ids=IDS)
def test_constructor_refuses(field, bad, error, match):
    fields = good_fields()
    fields[field] = bad(fields)
    with pytest.raises(error, match=match):
        Int4AWQTensor(**fields)


@pytest.mark.parametrize("shape", [(N,), (N, K, 1), (N, 0), (float(N), K), "48x200"])
def test_constructor_refuses_shape(shape):
    with pytest.raises(ValueError, match="shape must be a 2-D size"):
        Int4AWQTensor(**dict(good_fields(), shape=shape))
    with pytest.raises(ValueError, match=r"scales must have shape \[47, 4\]"):  # rows that do not match
        Int4AWQTensor(**dict(good_fields(), shape=torch.Size((N - 1, K))))


def test_good_fields_pass_everywhere_and_in_every_layout():
    fields = good_fields(torch.bfloat16)
    t = Int4AWQTensor(**fields)
    for target in (packing.CPU_BLOCKS, packing.CPU_INT4PACK, packing.TRITON):
        qweight = packing.repack(t.qweight, t.k_padded, packing.PLAIN, target, t.scales, t.zeros)
        Int4AWQTensor(**dict(fields, qweight=qweight, packing_format=target))
    Int4AWQTensor(**dict(fields, zeros=None, act_scale=None, activations="int8"))
    assert t[5:9].shape == (4, K) and t.to(torch.float32).dtype == torch.float32  # slicing and moves still work


def test_meta_and_fake_fields_skip_only_the_value_checks():
    fields = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in good_fields().items()}
    assert Int4AWQTensor(**fields).device.type == "meta"
    fake_mode = FakeTensorMode()
    fake = {k: fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
            for k, v in good_fields().items()}
    assert Int4AWQTensor(**fake).shape == (N, K)
    with fake_mode:  # while a fake mode is active too
        assert Int4AWQTensor(**fake).shape == (N, K)
    with pytest.raises(ValueError, match="scales must have shape"):  # shapes are still checked
        Int4AWQTensor(**dict(fake, scales=fake["scales"][:, :2]))


def test_checks_run_at_construction_never_per_call(monkeypatch):
    t = Int4AWQTensor(**good_fields())
    x = torch.randn(3, K)
    expected = F.linear(x, t)

    def refuse(*args, **kwargs):
        raise AssertionError("check_fields ran during a call")

    monkeypatch.setattr(tensor_module, "check_fields", refuse)
    assert torch.equal(F.linear(x, t), expected)


def _crafted(monkeypatch, t: torch.Tensor, cls=None, **changes) -> io.BytesIO:
    """torch.save(t) with the pickled state of ``t`` (or of its inner tensors of class
    ``cls``) changed: what an attacker's file can hold."""
    buf = io.BytesIO()
    cls = cls or type(t)
    honest = cls.__getstate__ if "__getstate__" in vars(cls) else (lambda self: dict(self.__dict__))
    with monkeypatch.context() as m:
        m.setattr(cls, "__getstate__", lambda self: {**honest(self), **changes})
        torch.save({"weight": t}, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("field, bad, error, match", BAD, ids=IDS)
def test_weights_only_load_of_a_crafted_file_refuses(monkeypatch, field, bad, error, match):
    fields = good_fields()
    t = Int4AWQTensor(**fields)
    buf = _crafted(monkeypatch, t, **{field: bad(fields)})
    with pytest.raises(error, match=match):
        torch.load(buf, weights_only=True)


def test_weights_only_load_refuses_a_crafted_state(monkeypatch):
    t = Int4AWQTensor(**good_fields())
    loaded = torch.load(_crafted(monkeypatch, t), weights_only=True)["weight"]
    assert torch.equal(loaded.qweight, t.qweight) and torch.equal(loaded.act_scale, t.act_scale)
    with pytest.raises(ValueError, match=r"unknown \['qweights'\]"):
        torch.load(_crafted(monkeypatch, t, qweights=t.qweight), weights_only=True)
    half = Int4AWQTensor(**good_fields(torch.float16))  # fields of another dtype than the pickled wrapper's
    with pytest.raises(ValueError, match="restored tensor is torch.float32.*scales are torch.float16"):
        torch.load(_crafted(monkeypatch, t, scales=half.scales, act_scale=half.act_scale), weights_only=True)
    # derived attributes are recomputed, never taken from the file
    loaded = torch.load(_crafted(monkeypatch, t, _in_features=3, _flat=(["scales"], {})), weights_only=True)["weight"]
    assert loaded._in_features == K and loaded.__tensor_flatten__()[0] == ["qweight", "scales", "zeros", "act_scale"]


def _quantized_linear(fields) -> nn.Linear:
    linear = nn.Linear(K, N, bias=False)
    linear.weight = nn.Parameter(Int4AWQTensor(**fields)._repacked_for("cpu", fields["scales"].dtype),
                                 requires_grad=False)
    return linear


@pytest.mark.parametrize("field, bad, error, match", BAD, ids=IDS)
def test_load_state_dict_checks_the_source(field, bad, error, match):
    """A source whose field was set after it was made (a tensor subclass's attributes can be)."""
    linear = _quantized_linear(good_fields(seed=1))
    fields = good_fields(seed=2)
    source = Int4AWQTensor(**fields)
    setattr(source, field, bad(fields))
    with pytest.raises(RuntimeError, match=match):  # load_state_dict wraps copy_'s error
        linear.load_state_dict({"weight": source})
    linear.load_state_dict({"weight": Int4AWQTensor(**fields)})  # the good one loads
    x = torch.randn(2, K)
    torch.testing.assert_close(linear(x), F.linear(x, Int4AWQTensor(**fields).dequantize()), rtol=0.03, atol=0.03)


# --- Int8HeadTensor ---------------------------------------------------------------------------

V, H = 40, 24


def head(dtype=torch.float32) -> Int8HeadTensor:
    return Int8HeadTensor.from_float(torch.randn(V, H, dtype=dtype))


def test_head_constructor_refuses():
    t = head()
    with pytest.raises(TypeError, match="halves must be an Int4AWQTensor, got Tensor"):
        Int8HeadTensor(t.halves.dequantize(), torch.Size((V, H)))
    with pytest.raises(ValueError, match=r"halves must have shape \[V, 2H\] = \[40, 50\]"):
        Int8HeadTensor(t.halves, torch.Size((V, H + 1)))
    with pytest.raises(ValueError, match="shape must be a 2-D size"):
        Int8HeadTensor(t.halves, torch.Size((V, 2 * H, 1)))
    one_group = Int4AWQTensor.from_float(torch.randn(V, 2 * H), 2 * H)
    with pytest.raises(ValueError, match=r"halves must have group_size H = 24.*got 48"):
        Int8HeadTensor(one_group, torch.Size((V, H)))
    scaled = t.halves._replace(act_scale=torch.rand(2 * H) + 0.5)
    with pytest.raises(ValueError, match="no act_scale"):
        Int8HeadTensor(scaled, torch.Size((V, H)))
    assert Int8HeadTensor(t.halves, torch.Size((V, H))).shape == (V, H)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.5])
def test_from_int8_refuses_scales_that_are_not_finite_and_positive(bad):
    codes = torch.randint(-128, 128, (V, H), dtype=torch.int8)
    scales = _poked(torch.rand(V) + 0.01, bad)
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        Int8HeadTensor.from_int8(codes, scales)
    assert Int8HeadTensor.from_int8(codes, scales.abs().nan_to_num(1.0, 1.0).clamp(min=1e-3)).shape == (V, H)


def test_head_weights_only_load_of_a_crafted_file_refuses(monkeypatch):
    t = head()
    loaded = torch.load(_crafted(monkeypatch, t), weights_only=True)["weight"]
    assert torch.equal(loaded.int8()[0], t.int8()[0])
    one_group = Int4AWQTensor.from_float(torch.randn(V, 2 * H), 2 * H)
    with pytest.raises(ValueError, match="halves must have group_size H = 24"):
        torch.load(_crafted(monkeypatch, t, halves=one_group), weights_only=True)
    with pytest.raises(TypeError, match="halves must be an Int4AWQTensor"):
        torch.load(_crafted(monkeypatch, t, halves=torch.randn(V, 2 * H)), weights_only=True)
    with pytest.raises(ValueError, match=r"exactly \['halves'\]"):
        torch.load(_crafted(monkeypatch, t, scales=torch.rand(V)), weights_only=True)
    nan = _poked(t.halves.scales, float("nan"))  # in the halves' own state: their restore checks it
    with pytest.raises(ValueError, match="scales must be finite"):
        torch.load(_crafted(monkeypatch, t, cls=Int4AWQTensor, scales=nan), weights_only=True)


def test_embedding_refuses_out_of_range_ids_like_torch():
    t = head()
    reference = nn.Embedding(V, H)
    ids = torch.randint(0, V, (3, 5))
    assert torch.equal(F.embedding(ids, t), t.dequantize()[ids])
    for bad in (-1 - int(torch.randint(0, V, ())), V + int(torch.randint(0, 5, ()))):
        wrong = ids.clone()
        wrong[1, 2] = bad
        with pytest.raises(IndexError):
            reference(wrong)  # what torch does
        with pytest.raises(IndexError, match=f"token id {bad} is out of range .* vocabulary of {V}"):
            F.embedding(wrong, t)
    with pytest.raises(TypeError, match="int64 or int32"):
        F.embedding(ids.float(), t)
    assert F.embedding(ids[:0], t).shape == (0, 5, H)
