"""Where the W4A8 GEMM beats weight-only on this CPU: the window of M that
``awqtensor/ops/w4a8.py``'s CPU_WINDOW sets per micro-kernel.

    python benchmarks/w4a8_route.py              # table on stdout, CSV in benchmarks/results/
    python benchmarks/w4a8_route.py --quick      # 4096x4096 and SmolLM2's fused gate/up only

For every shape of ``cpu_linear.py`` and M = 1..512 (fp32 activations, group size 64,
hot cache), times the same weight weight-only (``activations=None``: the int8 decode
kernel, or the dense route from its thresholds) and through the W4A8 GEMM with each
micro-kernel this CPU has (forced with ``w4a8.cpu_route(1, None, kernel)``), in turn,
keeping each cell's fastest of ``--repeats``. The ``default`` column says what the
default window picks and what that costs against the faster of the two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from awqtensor import Int4AWQTensor
from awqtensor.ops import cpu_kernel, w4a8
from common import cpu_device, provenance, slug, write_csv
from cpu_linear import SHAPES, median_ms

MS = (1, 4, 8, 16, 32, 64, 128, 256, 512)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="time every cell this many times, keep the fastest")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--csv", help="default: benchmarks/results/w4a8_route_<device>.csv")
    args = parser.parse_args()
    if cpu_kernel.unavailable() or not cpu_kernel.binding():
        raise SystemExit(f"the W4A8 GEMM lives in the C++ op, which is not built here: {cpu_kernel.unavailable()}")
    torch.set_num_threads(args.threads)
    kernels = [k for k in w4a8.cpu_kernels() if k != "scalar"]
    default = dict(w4a8._route)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k in ("4096x4096", "smol gate_up fused")}
    rows = []
    for shape, (n, k) in shapes.items():
        w = Int4AWQTensor.from_float(torch.randn(n, k) * 0.05, 64, activations="int8")
        weight_only = w._replace(activations=None)
        for m in MS:
            x = torch.randn(m, k)
            best = {}
            for _ in range(args.repeats):
                w4a8.cpu_route(**default)
                t = median_ms(lambda: F.linear(x, weight_only), args.min_time)
                best["weight-only"] = min(best.get("weight-only", t), t)
                for kernel in kernels:
                    w4a8.cpu_route(1, None, kernel)
                    t = median_ms(lambda: F.linear(x, w), args.min_time)
                    best[kernel] = min(best.get(kernel, t), t)
            w4a8.cpu_route(**default)
            picks = "w4a8" if w4a8.reasons(m, "cpu", 64, w.packing_format)["w4a8"] is None else "weight-only"
            picked = best[default["kernel"] or kernels[-1]] if picks == "w4a8" else best["weight-only"]
            fastest = min(best.values())
            row = {"shape": shape, "N": n, "K": k, "M": m, "weight_only_ms": round(best["weight-only"], 4),
                   **{f"{kernel}_ms": round(best[kernel], 4) for kernel in kernels},
                   "best_w4a8_speedup": round(best["weight-only"] / min(best[k] for k in kernels), 3),
                   "default_picks": picks, "default_cost": round(picked / fastest, 3),
                   "device": cpu_device(args.threads), **provenance()}
            rows.append(row)
            print(f"{shape:>20} M={m:<4} weight-only {best['weight-only']:8.3f} ms  "
                  + "  ".join(f"{kernel} {best[kernel]:8.3f}" for kernel in kernels)
                  + f"  W4A8 speedup {row['best_w4a8_speedup']:5.2f}  default: {picks} "
                  + ("ok" if row["default_cost"] <= 1.1 else f"{row['default_cost']:.2f}x the fastest"), flush=True)
    path = Path(args.csv or f"benchmarks/results/w4a8_route_{slug(cpu_device(args.threads))}.csv")
    write_csv(path, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
