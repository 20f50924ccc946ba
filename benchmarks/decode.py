"""End-to-end decode speed: dense, awqtensor's paths and llama.cpp, in the same run.

    python benchmarks/decode.py                      # CPU: SmolLM2-135M (fp32), llama.cpp Q4_0 as the peer
    python benchmarks/decode.py --prompt-tokens 512 --new-tokens 16    # prefill, in first_token_ms
    python benchmarks/decode.py --batch 8 --variants "awq generate"    # batched decode
    python benchmarks/decode.py --model llama-1b     # CUDA: random-weight Llama at 1B / 8B shapes (fp16)

Greedy decoding; tokens/s is measured between the first new token and the last,
``batch * (n - 1) / (t(n) - t(1))``, so the prompt's prefill is left out; it is in
``first_token_ms`` (``t(1)``: prefill and the first token). Variants (``--variants``):

* ``dense eager`` / ``dense compiled``: the float model, ``model.generate`` of transformers
  with a static cache (compiled: its forward through ``torch.compile``);
* ``awq eager`` / ``awq compiled`` / ``awq compiled fused``: the same with int4 weights
  (``fuse_``: q/k/v and gate/up fused), the head in float;
* ``awq compiled fused int8 only`` (CPU): the int8 kernel at every M, no dense route;
* ``awq fast_generate_``: int4 fused, 8-bit head (``quantize_head_``), ``model.generate``
  after ``awqtensor.fast_generate_`` (transformers compiles its decode step);
* ``awq generate``: the same weights through ``awqtensor.generate`` (its C++ decode step,
  ``awqtensor.native``); ``awq generate compiled``: its torch.compile'd step instead
  (``native=False``); ``awq generate max``: that with ``compile="max"`` (Inductor's C++ wrapper);
  ``awq w4a8 generate``: ``awq generate`` with ``activations="int8"`` (W4A8 where a call's M
  falls in the device's window: prompts of 16-511 tokens on the AMX Xeon);
* ``llama.cpp Q4_0`` (CPU, batch 1): the bundled GGUF requantized by llama.cpp
  (``benchmarks/llama_cpp_peer.py``; ``pip install -e ".[bench]"``; skipped with a
  message where llama-cpp-python is missing).

Weights are round-to-nearest g64: speed does not depend on the scales. Writes
``benchmarks/results/decode_<model>_<device>[_prompt<T>][_batch<B>].csv`` with ``speedup``
against dense compiled and ``vs_llama_cpp`` against llama.cpp Q4_0 (same run).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

import llama_cpp_peer
from awqtensor import fast_generate_, fuse_, generate, quantize_, quantize_head_, rtn_config
from common import cpu_device, provenance, slug, write_csv

SHAPES = {  # Llama-3.2-1B and Llama-3-8B
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}
CPU_VARIANTS = ["dense compiled", "awq compiled fused", "awq fast_generate_", "awq generate", "awq generate compiled",
                "awq generate max", "awq w4a8 generate", "llama.cpp Q4_0"]
CUDA_VARIANTS = ["dense eager", "dense compiled", "awq eager", "awq compiled", "awq compiled fused"]


def load(name: str, device: torch.device, dtype: torch.dtype):
    if name == "smollm2":
        from awqtensor import smollm2

        model, _ = smollm2.load(dtype)
        return model.to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**SHAPES[name], max_position_embeddings=4096)).to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def transformers_timer(model, ids, own_compile: bool):
    """``timed(n)`` through ``model.generate``; ``own_compile``: transformers compiles (the
    fast_generate_ settings), else whatever forward the model has, compiled or not."""
    def timed(n):
        sync(ids.device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       cache_implementation="static", disable_compile=not own_compile)
        sync(ids.device)
        return time.perf_counter() - t
    return timed


def lean_timer(model, ids, compile, native):
    def timed(n):
        t = time.perf_counter()
        generate(model, ids, n, compile=compile, native=native)
        return time.perf_counter() - t
    return timed


def measure(timed, new_tokens: int, batch: int) -> tuple[float, float]:
    """(tokens/s between the first new token and the last, seconds to the first token)."""
    for n in (new_tokens, 1, new_tokens, 1):  # compiles, and lets compiled graphs settle
        timed(n)
    one = min(timed(1) for _ in range(3))
    full = min(timed(new_tokens) for _ in range(3))
    return batch * (new_tokens - 1) / (full - one), one


def build(variant: str, base, group_size: int, mode):
    """The model a variant runs, and its timer factory."""
    model = base if variant.startswith("dense") else copy.deepcopy(base)
    if variant.startswith("awq"):
        activations = "int8" if "w4a8" in variant else None  # W4A8: int8 activations in its window of M
        quantize_(model, rtn_config(group_size=group_size, activations=activations))  # speed does not depend on the scales
        if "fused" in variant or "generate" in variant:
            fuse_(model)
        if "generate" in variant:
            quantize_head_(model)
    if variant.startswith(("awq generate", "awq w4a8 generate")):
        compile, native = ("max", False) if variant.endswith("max") else (True, variant.endswith("generate"))
        return model, lambda ids: lean_timer(model, ids, compile, native)
    if variant == "awq fast_generate_":
        fast_generate_(model)
        return model, lambda ids: transformers_timer(model, ids, own_compile=True)
    if "compiled" in variant:
        model.forward = torch.compile(model.forward, mode=mode, fullgraph=True)
    return model, lambda ids: transformers_timer(model, ids, own_compile=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (llama.cpp: 1 only)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", help=f"default on the CPU: {CPU_VARIANTS}; CUDA: {CUDA_VARIANTS}")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model != "smollm2" and device.type != "cuda":
        raise SystemExit(f"{args.model} is for a CUDA device; on the CPU use --model smollm2")
    variants = args.variants or (CPU_VARIANTS if device.type == "cpu" else CUDA_VARIANTS)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    mode = "reduce-overhead" if device.type == "cuda" else None
    base = load(args.model, device, dtype)
    ids = torch.randint(100, 1000, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_device(args.threads)
    rows = []
    for variant in variants:
        if variant.startswith("llama.cpp"):
            why = llama_cpp_peer.unavailable() or (None if args.batch == 1 else "batch 1 only here")
            if why or device.type != "cpu":
                print(f"{variant:<22} skipped: {why or 'a CPU peer'}", flush=True)
                continue
            engine, model = "llama.cpp", None
            prompt = ids[0].tolist()
            timed_tokens = llama_cpp_peer.timer(variant.split()[-1], args.threads,
                                                args.prompt_tokens + args.new_tokens + 8)
            timed = lambda n: timed_tokens(prompt, n)  # noqa: E731
        else:
            engine = "transformers" if variant.startswith("dense") else "awqtensor"
            model, timer = build(variant, base, args.group_size, mode)
            timed = timer(ids)
        saved = os.environ.get("AWQTENSOR_DISABLE")
        if variant.endswith("int8 only"):  # the CPU kernel at every M: no dense route for the prefill
            os.environ["AWQTENSOR_DISABLE"] = ",".join(filter(None, [saved, "cpu_dense"]))
        tps, first = measure(timed, args.new_tokens, args.batch)
        if saved is None:
            os.environ.pop("AWQTENSOR_DISABLE", None)
        else:
            os.environ["AWQTENSOR_DISABLE"] = saved
        rows.append({"device": name, "model": args.model, "dtype": str(dtype).removeprefix("torch."),
                     "engine": engine, "variant": variant, "batch": args.batch, "tokens_per_s": tps,
                     "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                     "first_token_ms": first * 1e3, **provenance()})
        print(f"{variant:<22} {tps:8.2f} tok/s, first token {first * 1e3:.0f} ms", flush=True)
        if model is base and "compiled" in variant:
            del model.forward  # back to the eager forward for the next variant
        del model, timed
        torch._dynamo.reset()
    reference = next((r["tokens_per_s"] for r in rows if r["variant"] == "dense compiled"), float("nan"))
    peer = next((r for r in rows if r["variant"] == "llama.cpp Q4_0"), None)
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / reference
        r["vs_llama_cpp"] = r["tokens_per_s"] / peer["tokens_per_s"] if peer else float("nan")
        r["first_token_vs_llama_cpp"] = r["first_token_ms"] / peer["first_token_ms"] if peer else float("nan")
    suffix = "" if args.prompt_tokens == 16 else f"_prompt{args.prompt_tokens}"
    suffix += "" if args.batch == 1 else f"_batch{args.batch}"
    path = write_csv(Path(args.out) / f"decode_{args.model}_{slug(rows[0]['device'])}{suffix}.csv", rows)
    print(f"\n{name}, batch {args.batch}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens")
    print(f"{'variant':<22} {'tok/s':>8} {'vs dense compiled':>18} {'vs llama.cpp Q4_0':>18} "
          f"{'first token ms':>15} {'(vs llama.cpp)':>15}")
    for r in rows:
        print(f"{r['variant']:<22} {r['tokens_per_s']:8.2f} {r['speedup']:18.2f} {r['vs_llama_cpp']:18.2f} "
              f"{r['first_token_ms']:15.0f} {r['first_token_vs_llama_cpp']:15.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
