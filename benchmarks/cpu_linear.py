"""Int4 linear vs the dense linear on the CPU, same run, same shapes.

    python benchmarks/cpu_linear.py            # table on stdout, CSV in benchmarks/results/

Shapes: 4096x4096 and SmolLM2-135M's (q/o 576x576, k/v 192x576, gate/up 1536x576,
down 576x1536); M = 1, 16, 128; fp32 and bf16 activations; group size 64.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from awqtensor import Int4AWQTensor

SHAPES = {"4096x4096": (4096, 4096), "smol q/o": (576, 576), "smol k/v": (192, 576),
          "smol gate/up": (1536, 576), "smol down": (576, 1536)}


def median_ms(fn, min_time=0.3) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--csv", default="benchmarks/results/cpu_linear.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"CPU {platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{args.threads} threads, torch {torch.__version__}, group size {args.group_size}")
    print(f"{'shape':<14} {'dtype':<9} {'M':>4} {'dense ms':>9} {'int4 ms':>9} {'int4 GB/s':>9} {'speedup':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, dtype=dtype) * 0.02
            q = Int4AWQTensor.from_float(w, args.group_size)
            qbytes = sum(t.numel() * t.element_size() for t in (q.qweight, q.scales, q.zeros))
            for m in (1, 16, 128):
                x = torch.randn(m, k, dtype=dtype)
                dense = median_ms(lambda: F.linear(x, w))
                int4 = median_ms(lambda: F.linear(x, q))
                row = {"shape": name, "N": n, "K": k, "dtype": str(dtype).split(".")[-1], "M": m,
                       "dense_ms": round(dense, 4), "int4_ms": round(int4, 4),
                       "int4_GBps": round(qbytes / int4 / 1e6, 2), "speedup": round(dense / int4, 3),
                       "packing": q.packing_format, "device": f"cpu {torch.backends.cpu.get_cpu_capability()} x{args.threads}",
                       "torch": torch.__version__}
                rows.append(row)
                print(f"{name:<14} {row['dtype']:<9} {m:>4} {dense:>9.3f} {int4:>9.3f} {row['int4_GBps']:>9.2f} {row['speedup']:>7.2f}x")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
