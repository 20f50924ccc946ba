"""AutoAWQ 0.2.9 on the reference protocol, so the README compares against a measured
AutoAWQ rather than a quoted one. AutoAWQ needs transformers 4.x, so this runs in an
environment of its own; it never imports awqtensor:

    python3.11 -m venv .venv-autoawq
    .venv-autoawq/bin/pip install torch==2.13.0 "transformers>=4.51,<4.52" accelerate datasets zstandard safetensors
    .venv-autoawq/bin/pip install --no-deps autoawq==0.2.9
    .venv-autoawq/bin/python benchmarks/autoawq_reference.py --out /tmp/smollm2-autoawq-g64

It quantizes with AutoAWQ's own ``quantize`` (scale search, clipping, folding, packing)
on the first 32 blocks of 512 tokens of the calibration text and writes AutoAWQ's own
checkpoint with ``save_quantized``, plus ``benchmark.json`` (time and peak RSS of the
quantization). ``benchmarks/perplexity.py --methods autoawq --autoawq-dir OUT`` then
loads that checkpoint with ``awqtensor.load_autoawq`` and evaluates it with the same
code as every other row: a real AutoAWQ checkpoint read by our loader.

One fix is applied to AutoAWQ, because without it AutoAWQ cannot quantize on a CPU at all:
its scale search saves the weights with ``{k: v.cpu() for k, v in state_dict().items()}``
and restores them after every grid point. On a GPU ``.cpu()`` copies; on a CPU it returns
the same tensor, so the first grid point's in-place ``weight.mul_(scales)`` overwrites the
"saved" weights, every later grid point is scored on doubly scaled weights, and the block
keeps weights scaled by a factor nothing undoes (perplexity in the hundreds of thousands).
``copy_saved_weights`` makes the saved state a copy, as it is on the GPU AutoAWQ targets.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def legacy_model_dir(path: Path) -> Path:
    """``path`` as transformers 4 must see it. transformers 5 writes RoPE's base as
    ``rope_parameters``, which 4.x ignores, silently falling back to theta 10000 (SmolLM2
    uses 100000): AutoAWQ would calibrate, and save, a different model. So the config is
    rewritten with ``rope_theta`` into a temporary directory that links the other files."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters", None)
    if rope is None:
        return path
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"{path}: rope_type {rope['rope_type']!r} has no transformers 4 spelling here")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None, torch_dtype=config.get("dtype", "float32"))
    legacy = Path(tempfile.mkdtemp(prefix="autoawq-model-"))
    for file in path.iterdir():
        if file.name != "config.json":
            (legacy / file.name).symlink_to(file.resolve())
    (legacy / "config.json").write_text(json.dumps(config, indent=2))
    return legacy


def copy_saved_weights():
    """Make AutoAWQ's scale search save a copy of the weights on a CPU (see the module
    docstring). Only ``state_dict`` of the module being inspected is wrapped, and only for
    the duration of one search."""
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._search_best_scale

    def search_on_copies(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
        target = layers[0] if module2inspect is None else module2inspect
        state_dict = target.state_dict
        target.state_dict = lambda *a, **k: {n: t.clone() for n, t in state_dict(*a, **k).items()}
        try:
            return search(self, module, prev_op, layers, inp, module2inspect, kwargs)
        finally:
            del target.state_dict

    AwqQuantizer._search_best_scale = search_on_copies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache/awqtensor/SmolLM2-135M-Instruct"),
                        help="the float model as a Hugging Face directory (awqtensor.smollm2 converts it once)")
    parser.add_argument("--calib-text", default="../shared/data/lee.txt")
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="directory for AutoAWQ's checkpoint")
    args = parser.parse_args()

    from awq import AutoAWQForCausalLM
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    model_dir = legacy_model_dir(Path(args.model_dir))
    # tokenizer.json itself: transformers 5's tokenizer_config.json names a class 4.x lacks
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    ids = tokenizer(Path(args.calib_text).read_text(), add_special_tokens=False)["input_ids"]
    n = args.seq_len
    blocks = [ids[i * n:(i + 1) * n] for i in range(args.calib_blocks)]
    if len(blocks[-1]) != n:
        raise SystemExit(f"{args.calib_text} holds fewer than {args.calib_blocks} blocks of {n} tokens")

    copy_saved_weights()
    model = AutoAWQForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    t = time.perf_counter()
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": args.group_size, "w_bit": 4,
                                            "version": "GEMM"},
                   calib_data=blocks, max_calib_samples=args.calib_blocks, max_calib_seq_len=n)
    quantize_s = time.perf_counter() - t
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.save_quantized(args.out)
    tokenizer.save_pretrained(args.out)
    result = {"quantize_s": quantize_s, "quantize_peak_rss_mb": peak_rss_mb, "group_size": args.group_size,
              "calib_blocks": args.calib_blocks, "seq_len": n, "threads": args.threads,
              "autoawq": __import__("awq").__version__, "torch": torch.__version__}
    (Path(args.out) / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
