"""Whole-model decode on a CUDA GPU: fp16 against awqtensor int4 (RTN g128, fused), same run.

    python benchmarks/gpu_decode.py            # on a CUDA GPU: table and CSV

A random-init Llama with Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32/8 heads, MLP
8192, vocabulary cut to 32000), fp16 weights. Greedy decode of ``--new-tokens`` after a
``--prompt-tokens`` prompt through ``awqtensor.generate``, eager and compiled, batch 1 and 8.
Random weights say nothing about quality; the check here is that the int4 model computes
what its own dequantized weights say (first-step logits, relative to their largest).
Output: ``benchmarks/results/gpu_decode_<device>.csv``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import awqtensor
from awqtensor import Int4AWQTensor
from common import provenance, slug, write_csv


def dequantized_copy(model):
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(getattr(module, "weight", None), Int4AWQTensor):
            module.weight = torch.nn.Parameter(module.weight.dequantize(), requires_grad=False)
    return ref


def tokens_per_s(model, ids, new_tokens, compile):
    awqtensor.generate(model, ids, new_tokens, compile=compile)  # warm-up (and compile)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = awqtensor.generate(model, ids, new_tokens, compile=compile)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return ids.shape[0] * (out.shape[1] - ids.shape[1]) / seconds, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU session")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1024)
    dense = LlamaForCausalLM(config).to("cuda", torch.float16).eval()
    int4 = copy.deepcopy(dense)
    awqtensor.quantize_(int4, awqtensor.rtn_config(group_size=128))
    awqtensor.fuse_(int4)
    ids = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device="cuda")
    with torch.no_grad():
        got = int4(ids).logits.double()
        want = dequantized_copy(int4)(ids).logits.double()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"int4 vs its dequantized weights, first-step logits: max rel err {rel:.2e}")
    name = torch.cuda.get_device_name()
    rows = []
    for batch in args.batches:
        prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_tokens), device="cuda")
        for label, model in (("fp16", dense), ("awq int4 g128 fused", int4)):
            for compile in (False, True):
                rate, _ = tokens_per_s(model, prompt, args.new_tokens, compile)
                rows.append({"device": name, "model": "Llama-3.2-1B shapes, random init", "batch": batch,
                             "variant": label, "compile": compile, "tokens_per_s": round(rate, 1),
                             "int4_logit_rel_err": rel, "new_tokens": args.new_tokens,
                             "prompt_tokens": args.prompt_tokens, **provenance()})
                print(f"batch {batch:<3} {label:<22} compile={compile!s:<5} {rate:8.1f} tokens/s", flush=True)
    path = write_csv(Path(args.out) / f"gpu_decode_{slug(name)}.csv", rows)
    print(f"wrote {path}")
    # Where a compiled int4 step spends its time (host and device), batch 1.
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        awqtensor.generate(int4, prompt, 16, compile=True)
        torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_device_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
