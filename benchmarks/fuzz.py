"""A long fuzzing run over checkpoint corruptions (the cases of tests/fuzz_checkpoints.py,
which the test suite runs a few dozen times each): counts how each corruption ended and
prints every contract violation with the corruption that caused it.

    .venv/bin/python benchmarks/fuzz.py --examples 400 [--csv benchmarks/results/fuzz.csv]
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from awqtensor import load_quantized, quantize_, quantize_head_, rtn_config, save_quantized  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from fuzz_checkpoints import CORRUPTIONS, outcome  # noqa: E402

from common import cpu_device, provenance, write_csv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400, help="corruptions per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(args.seed)
    model = tiny_llama(3)
    quantize_(model, rtn_config(group_size=32))
    quantize_head_(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        save_quantized(model, source, shard_size="40KB")
        tokens = torch.randint(0, 320, (1, 10))
        with torch.no_grad():
            want = load_quantized(source)(tokens).logits
        for kind, corrupt in sorted(CORRUPTIONS.items()):
            counts, failures, start = collections.Counter(), [], time.perf_counter()
            for i in range(args.examples):
                rng = random.Random(f"{args.seed}-{kind}-{i}")
                copy = Path(tmp) / "copy"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(source, copy)
                what = corrupt(rng, copy)
                try:
                    counts[outcome(load_quantized, copy, tokens, want)] += 1
                except Exception as err:  # a contract violation: reported, counted
                    counts["VIOLATION"] += 1
                    failures.append((what, "".join(traceback.format_exception_only(type(err), err)).strip(),
                                     traceback.extract_tb(err.__traceback__)[-1]))
            seconds = time.perf_counter() - start
            print(f"{kind:<16} {args.examples} corruptions in {seconds:.1f} s: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            for what, error, frame in failures[:5]:
                print(f"    {what}\n      {error.splitlines()[-1][:200]}\n      at {frame.filename}:{frame.lineno}")
            rows += [{"corruption": kind, "outcome": k, "count": v, "device": cpu_device(torch.get_num_threads()),
                      **provenance()} for k, v in sorted(counts.items())]
    if args.csv:
        write_csv(Path(args.csv), rows)
    if any(r["outcome"] == "VIOLATION" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
