"""transformers' own from_pretrained / save_pretrained on awqtensor checkpoints (registered at
import), against awqtensor's load_quantized / load_autoawq."""

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

import awqtensor
from awqtensor import Int4AWQTensor, Int8HeadTensor
from awqtensor.hf import route_autoawq
from conftest import tiny_llama


def awq_model(**overrides):
    model = tiny_llama(3, **overrides)
    data = [torch.randint(0, 320, (1, 64)) for _ in range(2)]
    awqtensor.quantize_(model, awqtensor.awq_config(group_size=32, n_samples=2, seq_len=64, n_grid=4),
                        calibration_data=data)
    return model


@pytest.mark.parametrize("tied,head", [(False, True), (True, False)])
def test_from_pretrained_loads_what_load_quantized_loads(tmp_path, caplog, tied, head):
    model = awq_model(tie_word_embeddings=tied)
    if head:
        awqtensor.quantize_head_(model)
    awqtensor.save_quantized(model, tmp_path / "q")
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        want = awqtensor.load_quantized(tmp_path / "q")(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        got = loaded(ids).logits
    assert "MISSING" not in caplog.text and "UNEXPECTED" not in caplog.text
    o_proj = loaded.model.layers[0].self_attn.o_proj.weight
    assert isinstance(o_proj, Int4AWQTensor) and o_proj.act_scale is not None  # AWQ's 1/s survived
    assert isinstance(loaded.lm_head.weight, Int8HeadTensor) == head
    assert torch.equal(got, want)

    loaded.save_pretrained(tmp_path / "again")  # transformers writes awqtensor's format back
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(ids).logits, want)
        assert torch.equal(awqtensor.load_quantized(tmp_path / "again")(ids).logits, want)


def test_from_pretrained_in_bfloat16_and_errors(tmp_path, caplog):
    model = awq_model()
    awqtensor.save_quantized(model, tmp_path / "q")
    ids = torch.randint(0, 320, (1, 16))
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    assert bf16.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        want = awqtensor.load_quantized(tmp_path / "q", dtype=torch.bfloat16)(ids).logits
        assert torch.equal(bf16(ids).logits, want)

    # A changed byte is caught by the digest config.json records, before transformers reads anything.
    file = tmp_path / "q" / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    with safetensors.safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors["model.layers.0.mlp.up_proj.weight.scales"][0, 0] *= 2
    safetensors.torch.save_file(tensors, file, metadata=metadata)
    with pytest.raises(ValueError, match="up_proj.weight.scales does not match its recorded digest"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")

    tiny_llama().save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=awqtensor.hf.AwqTensorConfig())


def test_autoawq_checkpoints_through_from_pretrained(tmp_path):
    model = tiny_llama(4)
    awqtensor.quantize_(model, awqtensor.rtn_config(group_size=32))
    awqtensor.save_autoawq(model, tmp_path / "awq")
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    ids = torch.randint(0, 320, (1, 16))
    route_autoawq()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "awq", dtype=torch.float16)
    finally:
        route_autoawq(False)
    assert isinstance(loaded.model.layers[0].mlp.gate_proj.weight, Int4AWQTensor)
    with torch.no_grad():
        want = awqtensor.load_autoawq(tmp_path / "awq", dtype=torch.float16)(ids).logits
        assert torch.equal(loaded(ids).logits, want)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_awq import AwqQuantizer

    assert AUTO_QUANTIZER_MAPPING["awq"] is AwqQuantizer
