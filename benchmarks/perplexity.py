"""SmolLM2-135M-Instruct perplexity by the reference protocol (../shared/data/README.md):
float vs round-to-nearest int4, with time and peak RSS. Prints a table, writes CSV.

    python benchmarks/perplexity.py --eval-text ../shared/data/enwiki_clean.txt --group-size 64
"""

from __future__ import annotations

import argparse
import csv
import platform
import resource
import time
from pathlib import Path

import torch

from awqtensor import evaluation, quantize_, rtn_config, smollm2


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-text", default="../shared/data/enwiki_clean.txt")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", default="benchmarks/results/perplexity_cpu.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = smollm2.load(torch.float32)
    blocks = evaluation.token_blocks(tokenizer, args.eval_text, args.seq_len, args.windows)
    rows = []
    t = time.perf_counter()
    rows.append({"method": "float", "ppl": evaluation.perplexity(model, blocks, "float"),
                 "quantize_s": 0.0, "eval_s": time.perf_counter() - t})
    t = time.perf_counter()
    quantize_(model, rtn_config(group_size=args.group_size))
    quantize_s = time.perf_counter() - t
    t = time.perf_counter()
    rows.append({"method": f"rtn g{args.group_size}", "ppl": evaluation.perplexity(model, blocks, "rtn"),
                 "quantize_s": quantize_s, "eval_s": time.perf_counter() - t})

    print(f"SmolLM2-135M-Instruct fp32, {args.windows} x {args.seq_len} tokens of {args.eval_text}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'method':<12} {'ppl':>8} {'quantize s':>11} {'eval s':>8}")
    for r in rows:
        print(f"{r['method']:<12} {r['ppl']:>8.2f} {r['quantize_s']:>11.1f} {r['eval_s']:>8.1f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "ppl", "quantize_s", "eval_s", "windows", "seq_len", "device", "torch"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "windows": args.windows, "seq_len": args.seq_len,
                             "device": f"cpu ({platform.machine()}, {args.threads} threads)", "torch": torch.__version__})


if __name__ == "__main__":
    main()
