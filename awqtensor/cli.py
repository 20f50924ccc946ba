"""The ``awqtensor`` command (also ``python -m awqtensor``).

    awqtensor quantize MODEL_DIR --out DIR [--method awq|gptq|rtn] [--rounding gptq] [--calib FILE]
                       [--format awqtensor|autoawq] [--overwrite]
    awqtensor quantize MODEL_DIR --out FILE.gguf --format gguf [...]     (for llama.cpp / ollama)
    awqtensor eval MODEL_DIR --text FILE [--windows 40] [--seq-len 512]
    awqtensor info PATH
    awqtensor generate MODEL_DIR --prompt TEXT [--max-new-tokens 128] [--raw]
    awqtensor demo [...]

MODEL_DIR is a Hugging Face model directory (float, awqtensor or AutoAWQ), or the word
``smollm2`` for the bundled SmolLM2-135M-Instruct. Bad input ends in one line on stderr
and exit status 2 (``AWQTENSOR_TRACEBACK=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("awqtensor", "autoawq", "gguf")


class CLIError(Exception):
    """Bad input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is under --help)."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def resolve_model_dir(name: str) -> Path:
    if name == "smollm2":
        from . import smollm2

        return smollm2.model_dir()
    path = Path(name)
    if not path.exists():
        raise CLIError(f"{path} does not exist (a model directory, or 'smollm2' for the bundled model)")
    if not (path / "config.json").is_file():
        raise CLIError(f"{path} has no config.json; expected a Hugging Face model directory")
    return path


def checkpoint_format(path: Path) -> str:
    """"float", "awqtensor" or "autoawq", from config.json's quantization_config."""
    from .checkpoint import read_config

    method = (read_config(path).get("quantization_config") or {}).get("quant_method")
    formats = {None: "float", "awqtensor": "awqtensor", "awq": "autoawq"}
    if method in formats:
        return formats[method]
    raise CLIError(f"{path}: quantization_config quant_method {method!r} is neither awqtensor's nor AutoAWQ's")


def load_any(path: Path, dtype: torch.dtype):
    """(model, tokenizer, format) for a float, awqtensor or AutoAWQ directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import load_autoawq, load_quantized

    fmt = checkpoint_format(path)
    if fmt == "float":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    else:
        model = (load_quantized if fmt == "awqtensor" else load_autoawq)(path, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CLIError(f"{path} has no usable tokenizer ({str(err).splitlines()[0]})") from err
    return model, tokenizer, fmt


def cmd_quantize(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import awq_config, gptq_config, quantize_, rtn_config, save_autoawq, save_quantized
    from .demo import linear_weight_bytes

    source = resolve_model_dir(args.model_dir)
    if checkpoint_format(source) != "float":
        raise CLIError(f"{source} is already quantized; quantize a float model")
    if args.method in ("awq", "gptq") and args.calib is None:
        raise CLIError(f"--method {args.method} needs --calib FILE: a text unlike the one you will evaluate on")
    if args.rounding == "gptq" and args.method != "awq":
        raise CLIError(f"--rounding gptq applies to --method awq (AWQ's scales, GPTQ's rounding); --method "
                       f"{args.method} has its own")
    if args.calib is not None and not Path(args.calib).is_file():
        raise CLIError(f"--calib {args.calib} is not a file")
    gguf = args.format == "gguf"
    out = Path(args.out)
    if not args.overwrite and out.is_dir() and out.resolve() == source.resolve():
        raise CLIError(f"--out {args.out} is the model directory being quantized; saving there would replace its "
                       f"weights: choose another --out (or add --overwrite)")
    if gguf and not args.out.endswith(".gguf"):
        raise CLIError(f"with --format gguf, --out names the file to write (ending in .gguf), got {args.out}")
    if gguf and args.activations:
        raise CLIError("--activations belongs to awqtensor's formats; llama.cpp chooses its own activation types")
    if args.method == "awq":  # configs first: a bad option fails before the model loads
        # AutoAWQ and GGUF have no per-input scale: groups nothing can fold keep scale 1.
        config = awq_config(group_size=args.group_size, n_samples=args.calib_samples, seq_len=args.seq_len,
                            activations=args.activations, act_scale=args.format == "awqtensor",
                            rounding=args.rounding)
    elif args.method == "gptq":
        config = gptq_config(group_size=args.group_size, n_samples=args.calib_samples, seq_len=args.seq_len,
                             activations=args.activations)
    else:
        config = rtn_config(group_size=args.group_size, activations=args.activations)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[args.dtype]).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    before = linear_weight_bytes(model)
    start = time.perf_counter()
    if args.method != "rtn":
        quantize_(model, config, calibration_data=Path(args.calib), tokenizer=tokenizer)
    else:
        quantize_(model, config)
    seconds = time.perf_counter() - start
    if gguf:
        from .gguf_export import save_gguf

        save_gguf(model, args.out, tokenizer, overwrite=args.overwrite)
    else:
        save = save_autoawq if args.format == "autoawq" else save_quantized
        save(model, args.out, overwrite=args.overwrite)
        tokenizer.save_pretrained(args.out)
    after = linear_weight_bytes(model)
    print(f"{args.method} g{args.group_size}: quantized in {seconds:.1f} s; decoder Linear weights "
          f"{before / 2**20:.1f} MB -> {after / 2**20:.1f} MB ({before / after:.1f}x smaller); "
          f"wrote {args.format} {'file' if gguf else 'checkpoint'} to {args.out}")


def cmd_eval(args) -> None:
    from . import evaluation

    path = resolve_model_dir(args.model_dir)
    if not Path(args.text).is_file():
        raise CLIError(f"--text {args.text} is not a file")
    model, tokenizer, fmt = load_any(path, DTYPES[args.dtype])
    blocks = evaluation.token_blocks(tokenizer, args.text, args.seq_len, args.windows)
    start = time.perf_counter()
    ppl = evaluation.perplexity(model, blocks, desc="eval")
    print(f"{path} ({fmt}, {args.dtype}): perplexity {ppl:.2f} on {blocks.shape[0]} x {args.seq_len} tokens "
          f"of {args.text} ({time.perf_counter() - start:.1f} s)")


def cmd_generate(args) -> None:
    """Stream a greedy answer to --prompt (through the model's chat template unless --raw),
    then tokens/s."""
    from . import generate

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    path = resolve_model_dir(args.model_dir)
    model, tokenizer, fmt = load_any(path, DTYPES[args.dtype])
    if not args.raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    new, shown, times = [], "", []

    def show(token):  # decode everything so far and print what is new (multi-byte characters)
        nonlocal shown
        times.append(time.perf_counter())
        new.append(int(token[0, 0]))
        text = tokenizer.decode(new, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text

    start = time.perf_counter()
    generate(model, ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, on_token=show)
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    print(f"\n[{path.name} ({fmt}): {len(new)} tokens; first after {times[0] - start:.2f} s, then "
          f"{decode:.1f} tokens/s]")


def cmd_info(args) -> None:
    from .checkpoint import read_config, weight_files

    path = Path(args.path)
    if not path.exists():
        raise CLIError(f"{path} does not exist")
    config = read_config(path)
    fmt = checkpoint_format(path)
    qc = config.get("quantization_config") or {}
    names = weight_files(path)
    files = sorted(set(names.values()))
    size = sum(f.stat().st_size for f in files)
    if fmt == "autoawq":
        quantized = sorted(n[: -len(".qweight")] for n in names if n.endswith(".qweight"))
        bits, group, skipped = qc.get("bits"), qc.get("group_size"), qc.get("modules_to_not_convert") or []
    elif fmt == "awqtensor":
        weights = qc.get("weights", {})
        if not isinstance(weights, dict) or not all(isinstance(w, dict) for w in weights.values()):
            raise CLIError(f"{path}: config.json's quantization_config.weights is not a mapping of descriptions")
        quantized = sorted(n.removesuffix(".weight") for n in weights)
        bits, group = 4, sorted({w.get("group_size") for w in weights.values()}, key=str)
        skipped = qc.get("modules_not_converted", [])
    else:
        quantized, bits, group, skipped = [], None, None, []
    info = {"path": str(path), "format": fmt, "model_type": config.get("model_type"),
            "dtype": config.get("dtype") or config.get("torch_dtype"), "bits": bits, "group_size": group,
            "quantized_linears": len(quantized), "linears_left_float": skipped,
            "files": [f.name for f in files], "bytes": size}
    if args.json:
        print(json.dumps({**info, "quantized": quantized}, indent=2))
        return
    for key, value in info.items():
        print(f"{key:<28} {value}")


def main(argv=None) -> int:
    parser = _Parser(prog="awqtensor", description="Activation-aware int4 weight quantization.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a float model directory and save it")
    q.add_argument("model_dir", help="Hugging Face model directory, or 'smollm2' for the bundled model")
    q.add_argument("--out", required=True, help="output directory (a .gguf file with --format gguf)")
    q.add_argument("--method", choices=("awq", "gptq", "rtn"), default="awq")
    q.add_argument("--rounding", choices=("nearest", "gptq"), default="nearest",
                   help="with --method awq: gptq rounds AWQ's scaled weights with GPTQ's error feedback")
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--calib", help="calibration text file (needed by --method awq)")
    q.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (AutoAWQ's default)")
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--format", choices=FORMATS, default="awqtensor",
                   help="awqtensor (default), autoawq (AutoAWQ/vLLM), gguf (a llama.cpp file of Q4_1 blocks)")
    q.add_argument("--activations", choices=("int8",), default=None,
                   help="int8: W4A8, int8 dynamic activations where a call is large enough to gain (default: weight-only)")
    q.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    q.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds even if it is the source or a different model")
    q.set_defaults(run=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a float, awqtensor or AutoAWQ model on a text file")
    e.add_argument("model_dir")
    e.add_argument("--text", required=True)
    e.add_argument("--windows", type=int, default=40)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    e.set_defaults(run=cmd_eval)

    i = sub.add_parser("info", help="what a checkpoint directory holds")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="machine-readable, with every quantized module")
    i.set_defaults(run=cmd_info)

    g = sub.add_parser("generate", help="stream a greedy answer from a float, awqtensor or AutoAWQ model")
    g.add_argument("model_dir", help="Hugging Face model directory, or 'smollm2' for the bundled model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--raw", action="store_true", help="the prompt as is, without the model's chat template")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    g.set_defaults(run=cmd_generate)

    d = sub.add_parser("demo", help="float vs RTN vs AWQ on the bundled SmolLM2 (python -m awqtensor.demo)",
                       add_help=False)
    d.set_defaults(run=None)

    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from . import demo

        demo.main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.run(args)
    except (CLIError, OSError, ValueError, TypeError, KeyError, ImportError) as err:
        if os.environ.get("AWQTENSOR_TRACEBACK") == "1":
            raise
        message = str(err) if not isinstance(err, KeyError) else f"missing entry {err}"
        print(f"awqtensor {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
