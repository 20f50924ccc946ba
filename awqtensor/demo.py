"""The demo: quantize the bundled SmolLM2-135M-Instruct and print what it gained.

    python -m awqtensor.demo --eval-text ../shared/data/enwiki_clean.txt
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from . import Int4AWQTensor, evaluation, quantize_, rtn_config, smollm2
from .api import default_filter


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights quantize_ selects by default (every Linear but lm_head)."""
    total = 0
    for name, module in model.named_modules():
        if default_filter(module, name):
            w = module.weight
            parts = (w.qweight, w.scales, w.zeros, w.act_scale) if isinstance(w, Int4AWQTensor) else (w,)
            total += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return total


@torch.no_grad()
def generate(model, tokenizer, prompt: str, new_tokens: int) -> tuple[str, float]:
    """Greedy completion of a chat prompt; returns (text, decode tokens/s)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), new_tokens / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description="Quantize SmolLM2-135M-Instruct to int4 and compare it with float.")
    parser.add_argument("--eval-text", default="../shared/data/enwiki_clean.txt", help="text for perplexity")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=10, help="512-token windows (the reference protocol uses 40)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = smollm2.load(torch.float32)
    blocks = evaluation.token_blocks(tokenizer, args.eval_text, 512, args.windows)
    prompt = "What is the capital of France? Answer in one sentence."

    results = {}
    quantized = copy.deepcopy(model)
    start = time.perf_counter()
    quantize_(quantized, rtn_config(group_size=args.group_size))
    quantize_s = time.perf_counter() - start
    for name, m in (("float32", model), (f"int4 g{args.group_size}", quantized)):
        ppl = evaluation.perplexity(m, blocks, desc=name)
        text, tps = generate(m, tokenizer, prompt, args.new_tokens)
        results[name] = (ppl, linear_weight_bytes(m), tps, text)

    print(f"\nSmolLM2-135M-Instruct, perplexity on {args.windows} x 512 tokens of {args.eval_text}, "
          f"{args.threads} threads; quantized (round-to-nearest) in {quantize_s:.1f} s")
    print(f"{'model':<12} {'perplexity':>10} {'decoder Linears':>15} {'decode tok/s':>13}")
    for name, (ppl, size, tps, _) in results.items():
        print(f"{name:<12} {ppl:>10.2f} {size / 2**20:>12.1f} MB {tps:>13.1f}")
    (f_ppl, f_size, f_tps, _), (q_ppl, q_size, q_tps, _) = results.values()
    print(f"weights {f_size / q_size:.1f}x smaller, perplexity +{q_ppl - f_ppl:.2f}, decode {q_tps / f_tps:.2f}x float speed")
    for name, (*_, text) in results.items():
        print(f"\n[{name}] {prompt}\n  -> {text}")


if __name__ == "__main__":
    main()
