"""End-to-end decode speed: the dense model against awqtensor, unfused and fused, same run.

    python benchmarks/decode.py                      # CPU: SmolLM2-135M (fp32), eager and compiled
    python benchmarks/decode.py --model llama-1b     # CUDA: random-weight Llama at 1B / 8B shapes (fp16)
    python benchmarks/decode.py --model llama-8b

Batch 1, greedy, a static KV cache; tokens/s is measured between the first new token and
the last (``(n - 1) / (t(n) - t(1))``), so the prompt's prefill is left out; it is in
``first_token_ms`` (``t(1)``: prefill and the first token; ``--prompt-tokens 512`` makes
it a prefill measurement, written to ``..._prompt512.csv``). Variants:
dense eager, dense compiled, awqtensor eager, awqtensor compiled unfused, awqtensor compiled fused
(``fuse_``), and on the CPU, "awq compiled fused int8 only" (no bf16 route: the kernel
prefills too); on CUDA compiled means ``mode="reduce-overhead"`` (CUDA graphs). Writes
``benchmarks/results/decode_<device>.csv`` with ``speedup`` against dense compiled.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from awqtensor import fuse_, quantize_, rtn_config
from common import cpu_device, provenance, slug, write_csv

SHAPES = {  # Llama-3.2-1B and Llama-3-8B
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}


def load(name: str, device: torch.device, dtype: torch.dtype):
    if name == "smollm2":
        from awqtensor import smollm2

        model, _ = smollm2.load(dtype)
        return model.to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**SHAPES[name], max_position_embeddings=4096)).to(dtype).eval()


def tokens_per_s(model, ids, new_tokens: int) -> float:
    def timed(n):
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                       disable_compile=True)  # we compile, or not, ourselves
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(new_tokens)  # compiles (twice for CUDA graphs to settle)
    timed(new_tokens)
    one = min(timed(1) for _ in range(2))  # the prompt's prefill and the first token
    full = min(timed(new_tokens) for _ in range(2))
    return (new_tokens - 1) / (full - one), one


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+",
                        default=["dense eager", "dense compiled", "awq eager", "awq compiled", "awq compiled fused"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model != "smollm2" and device.type != "cuda":
        raise SystemExit(f"{args.model} is for a CUDA device; on the CPU use --model smollm2")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    mode = "reduce-overhead" if device.type == "cuda" else None
    base = load(args.model, device, dtype)
    ids = torch.randint(100, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for variant in args.variants:
        model = base if variant.startswith("dense") else copy.deepcopy(base)
        if variant.startswith("awq"):
            quantize_(model, rtn_config(group_size=args.group_size))  # speed does not depend on the scales
            if "fused" in variant:
                fuse_(model)
        if "compiled" in variant:
            model.forward = torch.compile(model.forward, mode=mode, fullgraph=True)
        saved = os.environ.get("AWQTENSOR_DISABLE")
        if variant.endswith("int8 only"):  # the CPU kernel at every M: no bf16 route for the prefill
            os.environ["AWQTENSOR_DISABLE"] = ",".join(filter(None, [saved, "cpu_dense_bf16"]))
        tps, first = tokens_per_s(model, ids, args.new_tokens)
        if saved is None:
            os.environ.pop("AWQTENSOR_DISABLE", None)
        else:
            os.environ["AWQTENSOR_DISABLE"] = saved
        rows.append({"device": torch.cuda.get_device_name() if device.type == "cuda" else
                     cpu_device(args.threads), "model": args.model,
                     "dtype": str(dtype).removeprefix("torch."), "variant": variant, "tokens_per_s": tps,
                     "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                     "first_token_ms": first * 1e3, **provenance()})
        print(f"{variant:<22} {tps:8.2f} tok/s, first token {first * 1e3:.0f} ms", flush=True)
        if model is base and "compiled" in variant:
            del model.forward  # back to the eager forward for the next variant
        torch._dynamo.reset()
    reference = next((r["tokens_per_s"] for r in rows if r["variant"] == "dense compiled"), rows[0]["tokens_per_s"])
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / reference
    prompt = "" if args.prompt_tokens == 16 else f"_prompt{args.prompt_tokens}"
    path = write_csv(Path(args.out) / f"decode_{args.model}_{slug(rows[0]['device'])}{prompt}.csv", rows)
    print(f"\n{'variant':<22} {'tok/s':>8} {'speedup vs dense compiled':>26} {'first token ms':>15}")
    for r in rows:
        print(f"{r['variant']:<22} {r['tokens_per_s']:8.2f} {r['speedup']:26.2f} {r['first_token_ms']:15.0f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
