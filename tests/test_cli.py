"""The awqtensor command on a tiny Llama directory with a byte-level tokenizer built here
(nothing is downloaded)."""

import json
import subprocess
import sys

import pytest
import torch

from awqtensor.cli import main
from conftest import tiny_llama

TEXT = ("The quick brown fox jumps over the lazy dog while the calibration text rambles on "
        "about weights, activations and scales. ") * 40
OTHER = ("Perplexity is measured on a different text: rivers, mountains and the history of "
         "a small town by the sea, told slowly. ") * 40


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_llama(5, max_position_embeddings=256)
    model.save_pretrained(root / "float")
    _byte_tokenizer().save_pretrained(root / "float")
    (root / "calib.txt").write_text(TEXT)
    (root / "eval.txt").write_text(OTHER)
    return root


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_info_eval_in_both_formats(workdir, capsys):
    code, out, _ = run(capsys, "quantize", workdir / "float", "--out", workdir / "native", "--method", "awq",
                       "--calib", workdir / "calib.txt", "--calib-samples", "4", "--seq-len", "64",
                       "--group-size", "32")
    assert code == 0 and "smaller" in out
    code, out, _ = run(capsys, "quantize", workdir / "float", "--out", workdir / "awq", "--method", "rtn",
                       "--group-size", "32", "--format", "autoawq")
    assert code == 0
    for method in (["--method", "gptq"], ["--method", "awq", "--rounding", "gptq"]):
        code, out, _ = run(capsys, "quantize", workdir / "float", "--out", workdir / "gptq", *method, "--calib",
                           workdir / "calib.txt", "--calib-samples", "4", "--seq-len", "64", "--group-size", "32")
        assert code == 0 and "smaller" in out, out

    code, out, _ = run(capsys, "info", workdir / "native", "--json")
    info = json.loads(out)
    assert info["format"] == "awqtensor" and info["quantized_linears"] == 14 and info["group_size"] == [32]
    assert info["linears_left_float"] == ["lm_head"]
    code, out, _ = run(capsys, "info", workdir / "awq", "--json")
    info = json.loads(out)
    assert info["format"] == "autoawq" and info["bits"] == 4 and info["group_size"] == 32
    assert len(info["quantized"]) == 14 and info["linears_left_float"] == ["lm_head"]

    ppl = {}
    for name in ("float", "native", "awq"):
        code, out, _ = run(capsys, "eval", workdir / name, "--text", workdir / "eval.txt", "--windows", "4",
                           "--seq-len", "64")
        assert code == 0, out
        ppl[name] = float(out.split("perplexity ")[1].split()[0])
    assert all(p > 1 for p in ppl.values())
    assert ppl["native"] != ppl["float"]  # the quantized weights are what was evaluated


def test_quantize_to_gguf(workdir, capsys):
    """AWQ straight to a llama.cpp file: o_proj (grouped-query attention, nothing can fold its
    scale) keeps scale 1 instead of an act_scale GGUF could not hold."""
    gguf = pytest.importorskip("gguf")
    out_file = workdir / "model.gguf"
    code, out, err = run(capsys, "quantize", workdir / "float", "--out", out_file, "--method", "awq",
                         "--calib", workdir / "calib.txt", "--calib-samples", "4", "--seq-len", "64",
                         "--group-size", "32", "--format", "gguf")
    assert code == 0, err
    assert f"wrote gguf file to {out_file}" in out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out_file).tensors}
    assert sum(v == "Q4_1" for v in types.values()) == 14 and types["blk.0.attn_output.weight"] == "Q4_1"


def test_generate_streams_and_reports_speed(workdir, capsys):
    """awqtensor generate on the float and the quantized directories (the byte tokenizer has
    no chat template: the prompt goes as is): the streamed text is the greedy continuation."""
    from awqtensor import generate
    from awqtensor.cli import load_any

    for name in ("float", "native"):
        code, out, err = run(capsys, "generate", workdir / name, "--prompt", "The quick brown", "--max-new-tokens", "12")
        assert code == 0, err
        text, report = out.rsplit("\n[", 1)
        assert report.startswith(f"{name} (") and "12 tokens" in report and "tokens/s]" in report
        model, tokenizer, _ = load_any(workdir / name, torch.float32)
        ids = tokenizer("The quick brown", return_tensors="pt")["input_ids"]
        expected = generate(model, ids, 12, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        assert text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("argv,match", [
    (["quantize", "no/such/dir", "--out", "x", "--method", "rtn"], "does not exist"),
    (["quantize", "{float}", "--out", "x"], "--method awq needs --calib"),
    (["quantize", "{float}", "--out", "x", "--method", "gptq"], "--method gptq needs --calib"),
    (["quantize", "{float}", "--out", "x", "--method", "rtn", "--rounding", "gptq"], "--rounding gptq applies to"),
    (["eval", "{float}", "--text", "no-such.txt"], "is not a file"),
    (["info", "no/such/dir"], "does not exist"),
    (["generate", "{float}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "no/such/dir", "--prompt", "hi"], "does not exist"),
    (["quantize", "{float}", "--out", "x", "--method", "rtn", "--group-size", "48"], "group_size"),
    (["quantize", "{float}", "--out", "x", "--method", "rtn", "--format", "onnx"], "invalid choice: 'onnx'"),
    (["quantize", "{float}", "--out", "x", "--method", "rtn", "--format", "gguf"], "ending in .gguf"),
    (["quantize", "{float}", "--out", "x.gguf", "--method", "rtn", "--format", "gguf", "--activations", "int8"],
     "llama.cpp chooses"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, argv, match):
    argv = [a.format(float=workdir / "float") for a in argv]
    try:
        code, out, err = run(capsys, *argv)
    except SystemExit as exit:  # argparse's own checks
        code, (out, err) = exit.code, capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err, err


def test_module_entry_point(workdir):
    result = subprocess.run([sys.executable, "-m", "awqtensor", "info", str(workdir / "float")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "float" in result.stdout and "llama" in result.stdout
