"""Int4 linear on the CPU against the dense matmul, same run, same shapes.

    python benchmarks/cpu_linear.py              # table on stdout, CSV in benchmarks/results/
    python benchmarks/cpu_linear.py --quick      # 4096x4096 and gate/up only, M = 1 and 128
    python benchmarks/cpu_linear.py --repeats 2  # each cell twice, in turn; the faster median kept

Shapes: 4096x4096 and SmolLM2-135M's (q/o 576x576, k/v 192x576, gate/up 1536x576, down
576x1536, and the fused q/k/v 960x576 and gate/up 3072x576 that ``fuse_`` makes);
M = 1, 4, 16, 64, 128, 512; group size 64. Implementations, all called as
``F.linear(x, weight)``:

* ``dense fp32``, ``dense bf16``: torch's matmul on the float weight;
* ``torch int4 bf16``: torch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``,
  the ``cpu_int4pack`` layout) with bf16 activations, its fast case;
* ``awqtensor fp32``, ``awqtensor bf16``, ``awqtensor fp16``: awqtensor's op
  (``cpu_blocks``) on fp32, bf16 and fp16 activations (int8 activations inside, see
  awqtensor/ops/cpu_kernel.py, or the dense route for large M).

Each is timed twice: ``hot``, the same weight every call (a small one then sits in the
CPU's caches, which flatters the dense matmul), and ``cold``, cycling through copies that
together take twice the last-level cache, as the layers of a large model do. Speedups are
against ``dense fp32`` in the same cache state. The ``route`` column says whether
awqtensor's call ran the int8 kernel or, for large M, dequantize + matmul (bf16 on CPUs
with native bf16 matmuls, else fp32; ``cpu_kernel.dense_unsuitable``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from awqtensor import Int4AWQTensor, packing
from awqtensor.ops import cpu_kernel
from common import cpu_device, provenance, slug, write_csv

SHAPES = {"4096x4096": (4096, 4096), "smol q/o": (576, 576), "smol k/v": (192, 576),
          "smol gate/up": (1536, 576), "smol down": (576, 1536),
          "smol qkv fused": (960, 576), "smol gate_up fused": (3072, 576)}  # what fuse_ makes of them
MS = (1, 4, 16, 64, 128, 512)


def median_ms(fn, min_time: float) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def nbytes(w: torch.Tensor) -> int:
    if isinstance(w, Int4AWQTensor):
        return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros) if t is not None)
    return w.numel() * w.element_size()


def weights(n: int, k: int, group_size: int) -> dict[str, tuple[torch.Tensor, torch.dtype]]:
    """Implementation name -> (weight, activation dtype)."""
    w = torch.randn(n, k) * 0.02
    ours = Int4AWQTensor.from_float(w, group_size)
    assert ours.packing_format == packing.CPU_BLOCKS, ours
    plain = ours.plain_qweight()
    torch_int4 = Int4AWQTensor(plain, ours.scales.bfloat16(), group_size, ours.shape, packing.PLAIN, ours.zeros)
    torch_int4 = torch_int4._replace(
        qweight=packing.repack(plain, ours.k_padded, packing.PLAIN, packing.CPU_INT4PACK),
        packing_format=packing.CPU_INT4PACK)
    return {"dense fp32": (w, torch.float32), "dense bf16": (w.bfloat16(), torch.bfloat16),
            "torch int4 bf16": (torch_int4, torch.bfloat16), "awqtensor fp32": (ours, torch.float32),
            "awqtensor bf16": (ours.to(torch.bfloat16), torch.bfloat16),
            "awqtensor fp16": (ours.to(torch.float16), torch.float16)}


COLD_BYTES = max(96 << 20, 2 * cpu_kernel.last_level_cache_bytes())  # copies cycled through: twice the last-level cache


def cold_copies(weight) -> list:
    return [weight] + [weight.clone() for _ in range(max(1, COLD_BYTES // nbytes(weight)) - 1)]


def time_impl(weight, x, copies: list | None, min_time: float) -> float:
    if copies is None:
        return median_ms(lambda: F.linear(x, weight), min_time)
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(copies)
        F.linear(x, copies[state["i"]])

    return median_ms(step, min_time)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="two shapes, M = 1 and 128")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every cell this many times (in turn) and keep the fastest median: "
                             "on a shared machine, the one least disturbed by neighbours")
    parser.add_argument("--csv", help="default: benchmarks/results/cpu_linear_<device>.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = {k: SHAPES[k] for k in ("4096x4096", "smol gate/up")} if args.quick else SHAPES
    ms = (1, 128) if args.quick else MS
    device = f"{cpu_device(args.threads)}, kernel isa {cpu_kernel.isa()}"
    print(f"{device}, torch {torch.__version__}, group size {args.group_size}")
    header = f"{'shape':<18} {'cache':<5} {'M':>4} " + " ".join(f"{name:>16}" for name in
                                                               weights(16, 64, 32)) + "   ms, then speedup vs dense fp32"
    print(header)
    rows = []
    with torch.no_grad():
        for name, (n, k) in shapes.items():
            impls = weights(n, k, args.group_size)
            xs = {m: torch.randn(m, k) for m in ms}
            for cold in (False, True):
                times = {m: {} for m in ms}
                for _ in range(args.repeats):
                    for impl, (w, dtype) in impls.items():  # one implementation's copies in memory at a time
                        copies = cold_copies(w) if cold else None
                        for m in ms:
                            t = time_impl(w, xs[m].to(dtype), copies, args.min_time)
                            times[m][impl] = min(t, times[m].get(impl, t))
                        del copies
                for m in ms:
                    base = times[m]["dense fp32"]
                    for impl, ms_ in times[m].items():
                        w = impls[impl][0]
                        route = ""
                        if impl.startswith("awqtensor"):
                            route = "int8 kernel" if cpu_kernel.dense_unsuitable(m, n, k) else "dense route"
                        rows.append({"shape": name, "N": n, "K": k, "M": m, "cache": "cold" if cold else "hot",
                                     "impl": impl, "ms": round(ms_, 4), "weight_GBps": round(nbytes(w) / ms_ / 1e6, 2),
                                     "GFLOPs": round(2 * m * n * k / ms_ / 1e6, 2), "speedup": round(base / ms_, 3),
                                     "route": route, "group_size": args.group_size, "device": device, **provenance()})
                    print(f"{name:<18} {'cold' if cold else 'hot':<5} {m:>4} "
                          + " ".join(f"{t:>8.3f} {base / t:>6.2f}x" for t in times[m].values()), flush=True)
    path = Path(args.csv or f"benchmarks/results/cpu_linear_{slug(cpu_device(args.threads))}.csv")
    print(f"wrote {write_csv(path, rows)}")


if __name__ == "__main__":
    main()
