"""What a decode-sized (M = 1) call costs before any arithmetic, against the dense matmul.

    python benchmarks/call_floor.py               # table on stdout, CSV in benchmarks/results/
    python benchmarks/call_floor.py --repeats 5   # each cell five times, in turn; the fastest median kept

For each of SmolLM2's linear shapes (hot: the same weight every call), in the same run:

* ``dense fp32``: ``F.linear(x, w)`` on the float weight;
* ``awqtensor``: ``F.linear(x, w)`` on its Int4AWQTensor (the CPU kernel, 2 threads);
* ``subclass floor``: ``F.linear`` on a tensor subclass whose ``__torch_function__`` only
  returns a ready output: what any quantized-weight subclass pays to be called;
* ``op floor``: ``torch.ops.awqtensor.int4_linear`` on an empty batch (M = 0): what a
  custom op pays from Python (argument parsing, dispatch, the output's allocation);
* ``op``: the same op on the real batch, the kernel's time plus the op floor;
* ``best possible``: dense fp32 / (subclass floor + op floor), the speedup a kernel that took
  no time at all would show.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from awqtensor import Int4AWQTensor
from common import cpu_device, provenance, slug, write_csv
from cpu_linear import SHAPES as SWEEP_SHAPES, median_ms

SHAPES = {name.removeprefix("smol "): nk for name, nk in SWEEP_SHAPES.items() if name.startswith("smol ")}


class _Free(torch.Tensor):
    """A weight whose every function call returns a ready output."""

    out = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return cls.out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", help="default: benchmarks/results/call_floor_<device>.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = cpu_device(args.threads)
    print(f"{device}, torch {torch.__version__}; microseconds per call, M = 1, hot")
    names = ("dense fp32", "awqtensor", "subclass floor", "op floor", "op")
    print(f"{'shape':<14}" + "".join(f"{n:>15}" for n in names) + f"{'best possible':>15}{'awqtensor':>11}")
    rows = []
    with torch.no_grad():
        for shape, (n, k) in SHAPES.items():
            w = torch.randn(n, k) * 0.02
            q = Int4AWQTensor.from_float(w, 64)
            x, empty = torch.randn(1, k), torch.randn(0, k)
            free = torch.randn(n, k).as_subclass(_Free)
            _Free.out = torch.empty(1, n)
            op = torch.ops.awqtensor.int4_linear.default
            op_args = (q.qweight, q.scales, q.zeros, q.act_scale, None, q.group_size, q.packing_format)
            calls = {"dense fp32": lambda: F.linear(x, w), "awqtensor": lambda: F.linear(x, q),
                     "subclass floor": lambda: F.linear(x, free),
                     "op floor": lambda: op(empty, *op_args), "op": lambda: op(x, *op_args)}
            best = {name: float("inf") for name in calls}
            for _ in range(args.repeats):
                for name, fn in calls.items():
                    best[name] = min(best[name], median_ms(fn, args.min_time) * 1e3)
            floor = best["subclass floor"] + best["op floor"]
            ceiling, ours = best["dense fp32"] / floor, best["dense fp32"] / best["awqtensor"]
            print(f"{shape:<14}" + "".join(f"{best[n]:>15.2f}" for n in names) + f"{ceiling:>14.2f}x{ours:>10.2f}x")
            rows.append({"shape": shape, "N": n, "K": k, "M": 1,
                         **{f"{name.replace(' ', '_')}_us": round(best[name], 2) for name in names},
                         "best_possible_speedup": round(ceiling, 2), "awqtensor_speedup": round(ours, 2),
                         "device": device, **provenance()})
    path = Path(args.csv or f"benchmarks/results/call_floor_{slug(device)}.csv")
    print(f"wrote {write_csv(path, rows)}")


if __name__ == "__main__":
    main()
