"""SmolLM2-135M-Instruct perplexity by the reference protocol (../shared/data/README.md):
float, round-to-nearest and AWQ int4, with quantization time and peak RSS. Each method
runs in its own process so its peak RSS is its own. Prints a table, writes CSV.

    python benchmarks/perplexity.py --group-size 64 --methods float rtn awq
    python benchmarks/perplexity.py --group-size 64 --methods rtn gptq awq awq-gptq   # the four roundings

Weights are evaluated with exact matmuls; ``--cpu-kernel`` evaluates them through
awqtensor's CPU op as a model runs it, into ``perplexity_g{G}_cpu_kernel.csv``: the int8
kernel, except that large calls (all of the evaluation's 512-token windows) take the dense
route, bf16 on CPUs with native bf16 matmuls, else fp32 (``awqtensor/ops/cpu_kernel.py``);
``--int8-only`` turns that route off (``perplexity_g{G}_cpu_kernel_int8.csv``).

``--int8-head`` also evaluates the same quantized weights with the output head (tied to
the embedding) held in 8 bits (``awqtensor.quantize_head_``), column ``ppl_int8_head``.

``--native-step`` (with ``--cpu-kernel``) also evaluates them as ``awqtensor.generate`` decodes
on the CPU: ``fuse_``, then each window fed one token at a time through the C++ decode step
(``awqtensor.native``; the int8 kernel at M = 1), column ``ppl_native_step``.

``--methods rtn-w4a8 awq-w4a8``: W4A8 (``activations="int8"``), evaluated through the CPU's
W4A8 GEMM at every M (the format's own arithmetic: int8 activations per row and group).

``--methods torchao awq-torchao --base-config NAME``: torchao's own config (``int8-weight-only``,
``int8-dynamic``, ``int4-weight-only``, ``int8-dynamic-int4``; int4 in groups of --group-size)
alone, and AWQ over it (``awq_config(base_config=...)``).

``--methods autoawq --autoawq-dir DIR`` loads AutoAWQ's own checkpoint with
``awqtensor.load_autoawq`` and evaluates it the same way; ``benchmarks/autoawq_reference.py``
(its own environment) makes DIR.
Calibration (AWQ): the first 32 blocks of 512 tokens of --calib-text; evaluation: the
first --windows blocks of --eval-text. Never the same text.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from awqtensor import (awq_config, evaluation, fuse_, gptq_config, load_autoawq, quantize_, quantize_head_,
                       rtn_config, smollm2)
from awqtensor.calibration import calibrate
from awqtensor.ops import w4a8
from awqtensor.api import select_linears
from common import cpu_device, provenance

METHODS = ("float", "rtn", "gptq", "awq", "awq-gptq", "autoawq", "awq-two-step", "awq-float-propagation",
           "awq-noclip", "rtn-w4a8", "awq-w4a8", "torchao", "awq-torchao")


def torchao_config(name: str, group_size: int):
    """The torchao configs --base-config names (those that run on the CPU)."""
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup

    configs = {
        "int8-weight-only": lambda: tq.Int8WeightOnlyConfig(),
        "int8-dynamic": lambda: tq.Int8DynamicActivationInt8WeightConfig(),
        "int4-weight-only": lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)),
        "int8-dynamic-int4": lambda: tq.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)),
    }
    return configs[name]()


BASE_CONFIGS = ("int8-weight-only", "int8-dynamic", "int4-weight-only", "int8-dynamic-int4")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    """Quantize with one method and evaluate; runs in a child process."""
    torch.set_num_threads(args.threads)
    model, tokenizer = smollm2.load(torch.float32)
    activations = "int8" if args.method.endswith("-w4a8") else None
    t = time.perf_counter()
    if args.method == "autoawq":  # AutoAWQ's own checkpoint (benchmarks/autoawq_reference.py), its time and RSS
        if not args.autoawq_dir:
            raise SystemExit("--methods autoawq needs --autoawq-dir (see benchmarks/autoawq_reference.py)")
        model = load_autoawq(args.autoawq_dir, dtype=torch.float32)
        made = json.loads((Path(args.autoawq_dir) / "benchmark.json").read_text())
        quantize_s, quantize_rss = made["quantize_s"], made["quantize_peak_rss_mb"]
    elif args.method == "torchao":  # torchao's own quantize_, no AWQ
        import torchao

        torchao.quantization.quantize_(model.model, torchao_config(args.base_config, args.group_size))
    elif args.method.startswith("rtn"):
        quantize_(model, rtn_config(group_size=args.group_size, activations=activations))
    elif args.method == "gptq":  # GPTQ alone, on the same calibration blocks
        calib = evaluation.token_blocks(tokenizer, args.calib_text, args.seq_len, args.calib_blocks)
        quantize_(model, gptq_config(group_size=args.group_size, n_samples=args.calib_blocks, seq_len=args.seq_len),
                  calibration_data=calib)
    elif args.method.startswith("awq"):
        calib = evaluation.token_blocks(tokenizer, args.calib_text, args.seq_len, args.calib_blocks)
        config = awq_config(group_size=args.group_size, n_samples=args.calib_blocks, seq_len=args.seq_len,
                            clip=args.method != "awq-noclip", activations=activations,
                            rounding="gptq" if args.method == "awq-gptq" else "nearest",
                            base_config=torchao_config(args.base_config, args.group_size)
                            if args.method == "awq-torchao" else None)
        propagate = "float" if args.method == "awq-float-propagation" else "quantized"
        if args.method == "awq-two-step":  # prepare, the user's forwards, convert
            quantize_(model, awq_config(group_size=args.group_size, step="prepare"))
            with torch.no_grad():  # the decoder alone: the observers need no logits
                for batch in calib.split(4):
                    model.model(batch, use_cache=False)
            quantize_(model, awq_config(group_size=args.group_size, step="convert"))
        else:
            calibrate(model, config, select_linears(model, config), calib, propagate=propagate)
    if args.method != "autoawq":
        quantize_s = time.perf_counter() - t
        quantize_rss = peak_rss_mb()  # before the evaluation text is tokenized (a ~400 MB transient)
    if activations:  # every call through the W4A8 GEMM: the format's own arithmetic, exactly
        w4a8.cpu_route(1, None)
    blocks = evaluation.token_blocks(tokenizer, args.eval_text, args.seq_len, args.windows)
    t = time.perf_counter()
    ppl = evaluation.perplexity(model, blocks, args.method)
    label = f"{args.method}[{args.base_config}]" if "torchao" in args.method else args.method
    row = {"method": label, "group_size": args.group_size, "ppl": ppl, "quantize_s": quantize_s,
           "quantize_peak_rss_mb": quantize_rss, "eval_s": time.perf_counter() - t}
    if args.int8_head:
        quantize_head_(model)
        row["ppl_int8_head"] = evaluation.perplexity(model, blocks, f"{args.method} + int8 head")
    if args.native_step:
        t = time.perf_counter()
        row["ppl_native_step"] = native_step_perplexity(fuse_(model), blocks)
        row["native_step_eval_s"] = time.perf_counter() - t
    return row


@torch.no_grad()
def native_step_perplexity(model, blocks: torch.Tensor) -> float:
    """The protocol's perplexity with every window decoded token by token (teacher forced)
    through the C++ decode step, as awqtensor.generate runs it; the first token's logits
    from the model's forward."""
    import math

    import torch.nn.functional as F
    from transformers import StaticCache

    from awqtensor import native

    length = blocks.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length)
    plan, losses = None, []
    for block in blocks:
        ids = block.unsqueeze(0)
        cache.reset()
        logits = [model(input_ids=ids[:, :1], cache_position=torch.arange(1), cache=cache, use_cache=True).logits[:, -1]]
        if plan is None:  # the cache keeps its tensors across reset()
            plan = native.plan(model, cache, length)
        logits += [plan.step(ids[:, p:p + 1], p, False) for p in range(1, length - 1)]
        losses.append(F.cross_entropy(torch.cat(logits).float(), ids[0, 1:]).item())
    return math.exp(sum(losses) / len(losses))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-text", default="../shared/data/enwiki_clean.txt")
    parser.add_argument("--calib-text", default="../shared/data/lee.txt")
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["float", "rtn", "awq"])
    parser.add_argument("--base-config", choices=BASE_CONFIGS, default="int4-weight-only",
                        help="for --methods torchao awq-torchao: the torchao config (group size: --group-size)")
    parser.add_argument("--autoawq-dir", help="for --methods autoawq: benchmarks/autoawq_reference.py's --out")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # child process: run one method, print JSON
    parser.add_argument("--cpu-kernel", action="store_true",
                        help="evaluate with awqtensor's CPU kernel (int8 activations) instead of exact matmuls")
    parser.add_argument("--int8-only", action="store_true",
                        help="with --cpu-kernel: no dense route for large M, the int8 kernel everywhere")
    parser.add_argument("--int8-head", action="store_true",
                        help="also evaluate with the output head in 8 bits (column ppl_int8_head)")
    parser.add_argument("--native-step", action="store_true",
                        help="with --cpu-kernel: also decode each window through the C++ step (ppl_native_step)")
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/perplexity_g{group_size}"
                                                    "[_cpu_kernel[_int8]].csv")
    args = parser.parse_args()
    if args.native_step and not args.cpu_kernel:
        parser.error("--native-step needs --cpu-kernel (the C++ step runs the CPU kernel's layout)")
    if args.method:
        print("RESULT " + json.dumps(run_one(args)))
        return

    rows = []
    for method in args.methods:
        child = [sys.executable, __file__, "--method", method] + [
            a for a in sys.argv[1:] if a not in args.methods and a != "--methods"]
        # The quality of the weights is measured with exact matmuls (dequantize, then the dense
        # matmul), as the reference protocol does; --cpu-kernel measures what the kernel adds.
        env = dict(os.environ)
        disable = "cpu_dense" if args.cpu_kernel and args.int8_only else None if args.cpu_kernel else "cpu_blocks"
        if method.endswith("-w4a8"):  # the W4A8 GEMM is the exact arithmetic of that format
            disable = None
        if disable:
            env["AWQTENSOR_DISABLE"] = ",".join(filter(None, [env.get("AWQTENSOR_DISABLE"), disable]))
        out = subprocess.run(child, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.split("RESULT ", 1)[1]))
        r = rows[-1]
        head = f" (int8 head {r['ppl_int8_head']:.2f})" if "ppl_int8_head" in r else ""
        head += f" (C++ decode step {r['ppl_native_step']:.2f})" if "ppl_native_step" in r else ""
        print(f"{r['method']:<24} ppl {r['ppl']:.2f}{head}  quantize {r['quantize_s']:.1f} s  "
              f"peak RSS {r['quantize_peak_rss_mb']:.0f} MB  eval {r['eval_s']:.1f} s", flush=True)

    device = cpu_device(args.threads)
    matmul = "exact matmuls"
    if args.cpu_kernel:
        from awqtensor.ops import cpu_kernel

        route = cpu_kernel.dense_unsuitable(args.seq_len, 576, 576) if not args.int8_only else "off (--int8-only)"
        dense = f"{str(cpu_kernel._dense['dtype']).removeprefix('torch.')} route"
        matmul = "awqtensor's CPU op: int8 kernel" + (f"; {dense} {route}" if route else
                                                      f", {dense} from M = {cpu_kernel._dense['min_m']}")
    print(f"\nSmolLM2-135M-Instruct fp32, int4 asymmetric g{args.group_size}, {matmul}; calibration "
          f"{args.calib_blocks} x {args.seq_len} tokens of {args.calib_text}; evaluation {args.windows} x "
          f"{args.seq_len} tokens of {args.eval_text}; {device}, torch {torch.__version__}")
    print(f"{'method':<24} {'ppl':>7} {'int8 head':>10} {'C++ step':>9} {'quantize s':>11} {'peak RSS MB':>12} "
          f"{'eval s':>8}")
    for r in rows:
        head = f"{r['ppl_int8_head']:.2f}" if "ppl_int8_head" in r else "-"
        step = f"{r['ppl_native_step']:.2f}" if "ppl_native_step" in r else "-"
        print(f"{r['method']:<24} {r['ppl']:>7.2f} {head:>10} {step:>9} {r['quantize_s']:>11.1f} "
              f"{r['quantize_peak_rss_mb']:>12.0f} {r['eval_s']:>8.1f}")
    # Rows of methods not run this time are kept, so methods can be (re)measured one by one.
    suffix = ("_cpu_kernel" + ("_int8" if args.int8_only else "")) if args.cpu_kernel else ""
    suffix += "_int8_head" if args.int8_head else ""
    if args.csv is None and all(m.endswith("-w4a8") or "torchao" in m for m in args.methods):
        suffix += "_composition"  # issue 19's rows, apart from the int4 weight-only history
    path = Path(args.csv or f"benchmarks/results/perplexity_g{args.group_size}{suffix}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r)) + ["matmul", "windows", "calib_blocks", "seq_len", "device", "torch", "triton", "commit",
                              "command"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    def row_matmul(method: str) -> str:  # W4A8 and torchao's rows run their own kernels whatever the flags
        if method.endswith("-w4a8"):
            return "W4A8 GEMM at every M (int8 activations per row and group)"
        if "torchao" in method:
            return "torchao's tensors (int4 weight-only configs: their dequantize + matmul)"
        return matmul

    new = {r["method"]: {**r, "matmul": row_matmul(r["method"]), "windows": args.windows, "calib_blocks": args.calib_blocks, "seq_len": args.seq_len,
                         "device": device, "commit": commit, **provenance()} for r in rows}
    old = {}
    if path.is_file():
        with open(path, newline="") as f:
            old = {r["method"]: r for r in csv.DictReader(f) if r["method"] not in new}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        # METHODS' order first, then labelled rows (torchao[...]) as they came
        keys = [m for m in METHODS if m in new or m in old]
        keys += [m for m in [*old, *new] if m not in keys and m not in METHODS]
        for method in dict.fromkeys(keys):
            writer.writerow(new.get(method) or old[method])


if __name__ == "__main__":
    main()
