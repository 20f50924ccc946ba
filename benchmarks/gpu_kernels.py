"""The Triton int4 kernels against the dense matmul and torch's tinygemm, same run, same shapes.

    python benchmarks/gpu_kernels.py                       # on a CUDA GPU: table, CSV and PNG
    python benchmarks/gpu_kernels.py --write-thresholds    # also store the measured M thresholds
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --smoke   # no GPU: tiny shapes, checks the script

Shapes (N x K, Llama-3-8B): 4096x4096 (q/o), 6144x4096 (fused q/k/v), 28672x4096 (fused
gate/up), 4096x14336 (down). M in 1 .. 4096. Methods: fp16 and bf16 ``torch.matmul``,
``aten._weight_int4pack_mm`` (tinygemm, bf16), and awqtensor's ``gemv``, ``gemm`` and
``dequantize_matmul`` forced one at a time, plus ``auto`` (what the dispatcher picks), and
the W4A8 GEMM (``triton_w4a8.py``: int8 activations) forced at every M.
Output: ``benchmarks/results/gpu_kernels_<device>.csv`` with columns including ``M`` and
``speedup`` (vs fp16 in the same run), and a PNG of speedup against M per shape.
With ``--write-thresholds`` the largest M where gemv beats gemm, and where gemm beats
dequantize_matmul, become this device's thresholds (``awqtensor.ops.tuning``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from awqtensor import Int4AWQTensor, packing
from awqtensor.ops import gpu, triton_kernels, tuning
from common import provenance, slug, write_csv

SHAPES = {"q/o 4096x4096": (4096, 4096), "qkv 6144x4096": (6144, 4096),
          "gate/up 28672x4096": (28672, 4096), "down 4096x14336": (4096, 14336)}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
SMOKE_SHAPES = {"smoke 64x128": (64, 128)}
SMOKE_MS = (1, 16, 17)


def timer(device, cudagraph=False):
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        if cudagraph:  # replayed from a CUDA graph: the GPU's time alone, no Python launch cost
            def graphed(fn):
                try:
                    return do_bench_cudagraph(fn, rep=50)
                except Exception as err:  # a call that cannot be captured
                    print(f"not capturable: {type(err).__name__}: {str(err)[:120]}")
                    return float("nan")

            return graphed
        return lambda fn: do_bench(fn, warmup=10, rep=50)
    import time

    def cpu_ms(fn):
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cpu_ms


def tinygemm(x_bf16, w_fp, group_size):
    """torch's int4 CUDA kernel on the same weights (its own quantization, bf16 only)."""
    if x_bf16.device.type != "cuda":
        return None
    n, k = w_fp.shape
    from awqtensor import quant

    scales, zeros = quant.choose_qparams(w_fp.float(), group_size, True)
    codes = quant.quantize(w_fp.float(), scales, zeros, group_size).to(torch.int32)
    high_first = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # this kernel's nibble order
    packed = torch.ops.aten._convert_weight_to_int4pack(high_first.to(x_bf16.device), 8)
    offset = (8 - zeros.float()) * scales.float()
    sz = torch.stack((scales.float(), offset), -1).transpose(0, 1).contiguous().to(x_bf16.device, torch.bfloat16)
    return lambda: torch.ops.aten._weight_int4pack_mm(x_bf16, packed, group_size, sz)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (for the interpreter, no GPU)")
    parser.add_argument("--write-thresholds", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--ms", type=int, nargs="+", help=f"the M values (default {MS})")
    parser.add_argument("--cudagraph", action="store_true",
                        help="time CUDA-graph replays: kernel time without the Python launch cost")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.smoke or not triton_kernels.interpreting():
            raise SystemExit("no CUDA device: run with TRITON_INTERPRET=1 and --smoke to check the script")
        os.environ["AWQTENSOR_BACKEND"] = "triton"
    shapes, ms = (SMOKE_SHAPES, SMOKE_MS) if args.smoke else (SHAPES, tuple(args.ms or MS))
    bench = timer(device, args.cudagraph)
    name = tuning.device_name(device)
    rows = []
    gs = args.group_size if not args.smoke else 32
    for shape, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        weights = {dt: Int4AWQTensor.from_float(w.to(dt), gs) for dt in (torch.float16, torch.bfloat16)}
        assert all(t.packing_format == packing.TRITON for t in weights.values())
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            times = {"fp16 matmul": bench(lambda: x @ w.T)}
            xb, wb = x.bfloat16(), w.bfloat16()
            times["bf16 matmul"] = bench(lambda: xb @ wb.T)
            tiny = tinygemm(xb, w, gs)
            if tiny is not None:
                times["tinygemm bf16"] = bench(tiny)
            for dt, t in weights.items():
                xd = x.to(dt)
                label = str(dt).removeprefix("torch.")
                times[f"awq auto {label}"] = bench(lambda: torch.nn.functional.linear(xd, t))
                for kernel in ("gemv", "gemm", "dequantize_matmul"):
                    if kernel == "gemv" and m > 64:
                        continue
                    os.environ["AWQTENSOR_DISABLE"] = ",".join(x for x in ("gemv", "gemm") if x != kernel)
                    times[f"awq {kernel} {label}"] = bench(lambda: torch.nn.functional.linear(xd, t))
                    os.environ.pop("AWQTENSOR_DISABLE")
                # W4A8 (issue 19): int8 activations, forced at every M (the switch sends M >= CUDA_MIN_M)
                times[f"awq w4a8 {label}"] = bench(lambda: gpu.w4a8_linear(xd, t.qweight, t.scales, t.zeros, None,
                                                                           None, gs))
            weight_bytes = {"fp16": n * k * 2, "int4": n * k // 2 + n * (k // gs) * 3}
            for method, ms_ in times.items():
                int4 = method.startswith(("awq", "tinygemm"))
                moved = (weight_bytes["int4"] if int4 else weight_bytes["fp16"]) + 2 * m * (k + n)
                rows.append({"device": name, "shape": shape, "N": n, "K": k, "M": m, "method": method,
                             "ms": ms_, "GB/s": moved / ms_ / 1e6, "TFLOP/s": 2 * m * n * k / ms_ / 1e9,
                             "speedup": times["fp16 matmul"] / ms_, "group_size": gs,
                             "chosen": gpu.choose(m, device) if "auto" in method else "",
                             "timing": "cuda graph" if args.cudagraph else "launches", **provenance()})
            best = {r["method"]: r["speedup"] for r in rows[-len(times):]}
            print(f"{shape:<20} M={m:<5} " + "  ".join(f"{k_}: {v:.2f}x" for k_, v in best.items()), flush=True)
    suffix = "_cudagraph" if args.cudagraph else ""
    csv_path = write_csv(Path(args.out) / f"gpu_kernels_{slug(name)}{suffix}.csv", rows)
    print(f"wrote {csv_path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
    else:
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            for method in sorted({r["method"] for r in rows if r["shape"] == shape}):
                pts = [(r["M"], r["speedup"]) for r in rows if r["shape"] == shape and r["method"] == method]
                ax.plot(*zip(*pts), marker="o", label=method)
            ax.set(xscale="log", title=shape, xlabel="M", ylabel="speedup vs fp16 matmul")
            ax.axhline(1, color="grey", lw=0.5)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(name)
        fig.savefig(csv_path.with_suffix(".png"), dpi=110, bbox_inches="tight")
        print(f"wrote {csv_path.with_suffix('.png')}")
    if args.write_thresholds:
        def total(kernel, m):  # fp16, summed over the shapes
            return sum(r["ms"] for r in rows if r["M"] == m and r["method"] == f"awq {kernel} float16")

        gemv_max = max((m for m in ms if m <= 64 and total("gemv", m) < total("gemm", m)), default=0)
        gemm_max = max((m for m in ms if total("gemm", m) < total("dequantize_matmul", m)), default=0)
        path = tuning.set_thresholds(device, gemv_max_m=gemv_max, gemm_max_m=gemm_max)
        print(f"thresholds gemv_max_m={gemv_max} gemm_max_m={gemm_max} written to {path}")


if __name__ == "__main__":
    main()
