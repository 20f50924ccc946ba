"""Where the C++ op's dense route starts to beat the int8 kernel, on this CPU.

    python benchmarks/cpu_route.py              # table on stdout, CSV in benchmarks/results/
    python benchmarks/cpu_route.py --repeats 3  # each cell three times, in turn; the fastest kept

For calls of M rows, awqtensor's CPU op either runs its int8 kernel or (on CPUs with
native bf16 matmuls, from ``cpu_kernel.DENSE_MIN_M`` rows and ``DENSE_MIN_MACS``
multiply-adds) dequantizes the weight to bf16 and calls torch's matmul. This times both
on every shape of ``cpu_linear.py`` for M = 4..128, fp32 activations, hot cache (the
weight's dequantization is repeated per call either way), forcing each with
``cpu_kernel.dense_route``, and says which one the default thresholds pick: the
``default`` column is ``ok`` where they pick the faster one (within 10%), else what it
costs. Run it to check or retune the thresholds on a new CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from awqtensor import Int4AWQTensor
from awqtensor.ops import cpu_kernel
from common import cpu_device, provenance, slug, write_csv
from cpu_linear import SHAPES, median_ms

MS = (4, 8, 16, 32, 64, 128, 256, 512)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="time every cell this many times, keep the fastest")
    parser.add_argument("--csv", help="default: benchmarks/results/cpu_route_<device>.csv")
    args = parser.parse_args()
    if cpu_kernel.unavailable() or not cpu_kernel.binding():
        raise SystemExit(f"the dense route lives in the C++ op, which is not built here: {cpu_kernel.unavailable()}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = f"{cpu_device(args.threads)}, kernel isa {cpu_kernel.isa()}"
    default = cpu_kernel.dense_route(None)  # the settings to restore, and to judge
    rule = "off" if default["min_m"] is None else f"M >= {default['min_m']} and >= {default['min_macs']} MACs"
    print(f"{device}, torch {torch.__version__}; default route: {rule}")
    print(f"{'shape':<18} {'M':>4} {'MACs':>8} {'int8 ms':>9} {'route ms':>9} {'faster':>7} {'default':>12}")
    rows = []
    with torch.no_grad():
        for name, (n, k) in SHAPES.items():
            weight = Int4AWQTensor.from_float(torch.randn(n, k) * 0.02, 64)
            for m in MS:
                x = torch.randn(m, k)
                best = {}
                for _ in range(args.repeats):
                    for route, setting in (("int8", dict(min_m=None)), ("route", dict(min_m=1, min_macs=0))):
                        cpu_kernel.dense_route(**setting)
                        t = median_ms(lambda: F.linear(x, weight), args.min_time)
                        best[route] = min(t, best.get(route, t))
                cpu_kernel.dense_route(**default)
                picked = "int8" if cpu_kernel.dense_unsuitable(m, n, k) else "route"
                faster = min(best, key=best.get)
                cost = best[picked] / best[faster]
                verdict = "ok" if cost <= 1.1 else f"{cost:.2f}x slower"
                print(f"{name:<18} {m:>4} {m * n * k / 1e6:>7.1f}M {best['int8']:>9.4f} {best['route']:>9.4f} "
                      f"{best['int8'] / best['route']:>6.2f}x {picked + ' ' + verdict:>12}", flush=True)
                rows.append({"shape": name, "N": n, "K": k, "M": m, "int8_ms": round(best["int8"], 4),
                             "route_ms": round(best["route"], 4), "route_speedup": round(best["int8"] / best["route"], 3),
                             "default_picks": picked, "default_cost": round(cost, 3),
                             "default_min_m": default["min_m"], "default_min_macs": default["min_macs"],
                             "device": device, **provenance()})
    cpu_kernel.dense_route(**default)
    path = Path(args.csv or f"benchmarks/results/cpu_route_{slug(cpu_device(args.threads))}.csv")
    print(f"wrote {write_csv(path, rows)}")


if __name__ == "__main__":
    main()
