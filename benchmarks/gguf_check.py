"""awqtensor's GGUF export checked by llama.cpp: perplexity of the same weights in both.

    pip install -e ".[bench]"        # llama-cpp-python (builds llama.cpp, ~3-5 min)
    python benchmarks/gguf_check.py  # ~15 min on 2 cores

SmolLM2-135M-Instruct fp32, the data protocol of ../shared/data (calibration: 32 x 512
tokens of lee.txt; evaluation: 40 x 512 tokens of enwiki_clean.txt). For each method the
model is quantized once, its perplexity measured by awqtensor, then ``save_gguf`` writes it
(embeddings F16, Q4_1 blocks) and llama.cpp (llama-cpp-python) evaluates the same token
blocks. Rows also give the largest logit difference on the first block, relative to the
largest logit. Peers in the same run: the bundled GGUF as llama.cpp reads it (its Q4_1
weights *are* our float model), and llama.cpp's own Q4_0 of it. Note that llama.cpp
quantizes activations to 8 bits per 32 for its Q4 matmuls, so the two engines differ by
that even on identical weights.
Output: ``benchmarks/results/gguf_llama_cpp.csv``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import awqtensor
from awqtensor import evaluation, smollm2
from common import cpu_device, provenance, write_csv
from llama_cpp_peer import _quiet, gguf as llama_cpp_gguf, unavailable


def llama_cpp_perplexity(path: Path, blocks: torch.Tensor, threads: int):
    """(perplexity, logits of the first block) from llama.cpp on ``blocks``."""
    import llama_cpp

    _quiet(llama_cpp)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=blocks.shape[1], n_batch=blocks.shape[1], logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    losses, first = [], None
    for block in blocks.tolist():
        llm.reset()
        llm.eval(block)
        logits = torch.from_numpy(np.array(llm.scores[:len(block)], dtype=np.float32))
        first = logits if first is None else first
        losses.append(F.cross_entropy(logits[:-1], torch.tensor(block[1:])).item())
    return math.exp(sum(losses) / len(losses)), first


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-text", default="../shared/data/enwiki_clean.txt")
    parser.add_argument("--calib-text", default="../shared/data/lee.txt")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["rtn", "awq", "awq act_scale"],
                        help="rtn; awq (act_scale=False, as GGUF needs); 'awq act_scale' (awqtensor only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/gguf_llama_cpp.csv")
    args = parser.parse_args()
    if (why := unavailable()) is not None:
        raise SystemExit(why)
    torch.set_num_threads(args.threads)
    _, tokenizer = smollm2.load()
    blocks = evaluation.token_blocks(tokenizer, args.eval_text, 512, args.windows)
    calib = evaluation.token_blocks(tokenizer, args.calib_text, 512, 32)
    rows = []

    def row(method, engine, ppl, **extra):
        rows.append({"method": method, "engine": engine, "perplexity": round(ppl, 3), **extra,
                     "windows": args.windows, "device": cpu_device(args.threads), **provenance()})
        print(f"{method:<34} {engine:<12} perplexity {ppl:7.3f}  " + "  ".join(f"{k} {v}" for k, v in extra.items()),
              flush=True)

    for quant, label in (("source", "bundled Q4_1 GGUF (= the float model)"), ("Q4_0", "llama.cpp's own Q4_0")):
        path = smollm2.gguf_path() if quant == "source" else llama_cpp_gguf(quant)
        row(label, "llama.cpp", llama_cpp_perplexity(path, blocks, args.threads)[0])
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            model, _ = smollm2.load()
            gs = args.group_size
            start = time.perf_counter()
            if method == "rtn":
                awqtensor.quantize_(model, awqtensor.rtn_config(group_size=gs))
            else:
                config = awqtensor.awq_config(group_size=gs, n_samples=32, seq_len=512,
                                              act_scale=method == "awq act_scale")
                awqtensor.quantize_(model, config, calibration_data=calib)
            quantize_s = round(time.perf_counter() - start, 1)
            name = {"rtn": f"rtn g{gs}", "awq": f"awq g{gs} act_scale=False",
                    "awq act_scale": f"awq g{gs} (with act_scale; not GGUF)"}[method]
            ours = evaluation.perplexity(model, blocks)
            row(name, "awqtensor", ours, quantize_s=quantize_s)
            if method == "awq act_scale":  # GGUF cannot hold it: awqtensor's own number only
                continue
            path = awqtensor.save_gguf(model, Path(tmp) / f"{method}.gguf", tokenizer)
            theirs, logits = llama_cpp_perplexity(path, blocks, args.threads)
            with torch.no_grad():
                want = model(blocks[:1]).logits[0].float()
            rel = ((logits - want).abs().max() / want.abs().max()).item()
            row(name, "llama.cpp", theirs, ratio_to_awqtensor=round(theirs / ours, 4),
                max_rel_logit_diff=f"{rel:.3g}", gguf_mb=round(path.stat().st_size / 2**20, 1))
    print(f"wrote {write_csv(Path(args.out), rows)}")


if __name__ == "__main__":
    main()
