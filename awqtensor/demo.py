"""The demo: quantize the bundled SmolLM2-135M-Instruct with AWQ and print what it gained
against the float model and round-to-nearest.

    python -m awqtensor.demo --eval-text ../shared/data/enwiki_clean.txt

AWQ calibrates on --calib-text (a different text from the evaluation one), lighter than
the benchmark's 32 x 512 so the demo takes minutes: see benchmarks/perplexity.py for
the reference protocol.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from . import Int4AWQTensor, awq_config, evaluation, fuse_, generate, quantize_, rtn_config, smollm2
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
def complete(model, tokenizer, prompt: str, new_tokens: int) -> tuple[str, float]:
    """Greedy completion of a chat prompt through ``awqtensor.generate`` (its C++ decode
    step on the CPU); returns (text, tokens/s, prompt included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    generate(model, ids, 2)  # warm-up
    start = time.perf_counter()
    out = generate(model, ids, new_tokens)
    elapsed = time.perf_counter() - start
    answer = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in answer:  # timed over new_tokens; shown up to the end of the turn
        answer = answer[:answer.index(tokenizer.eos_token_id)]
    return tokenizer.decode(answer, skip_special_tokens=True).strip(), new_tokens / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description="Quantize SmolLM2-135M-Instruct to int4 and compare it with float.")
    parser.add_argument("--eval-text", default="../shared/data/enwiki_clean.txt", help="text for perplexity")
    parser.add_argument("--calib-text", default="../shared/data/lee.txt", help="text for AWQ calibration")
    parser.add_argument("--calib-samples", type=int, default=8, help="512-token calibration sequences")
    parser.add_argument("--search-tokens", type=int, default=2048, help="tokens the scale search's loss uses")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=10, help="512-token windows (the reference protocol uses 40)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = smollm2.load(torch.float32)
    blocks = evaluation.token_blocks(tokenizer, args.eval_text, 512, args.windows)
    prompt = "What is the capital of France? Answer in one sentence."

    calib = evaluation.token_blocks(tokenizer, args.calib_text, 512, args.calib_samples)
    configs = {
        f"rtn g{args.group_size}": (rtn_config(group_size=args.group_size), None),
        f"awq g{args.group_size}": (awq_config(group_size=args.group_size, n_samples=args.calib_samples,
                                               seq_len=512, search_tokens=args.search_tokens), calib),
    }
    results, times = {}, {}
    for name, m in [("float32", model)] + [(name, copy.deepcopy(model)) for name in configs]:
        if name in configs:
            config, data = configs[name]
            start = time.perf_counter()
            quantize_(m, config, calibration_data=data)
            times[name] = time.perf_counter() - start
        ppl = evaluation.perplexity(m, blocks, desc=name)
        if name in configs:
            fuse_(m)  # q/k/v and gate/up as one int4 GEMM each: the same outputs, faster
        text, tps = complete(m, tokenizer, prompt, args.new_tokens)
        results[name] = (ppl, linear_weight_bytes(m), tps, text)

    print(f"\nSmolLM2-135M-Instruct, perplexity on {args.windows} x 512 tokens of {args.eval_text}, "
          f"{args.threads} threads; AWQ calibrated on {args.calib_samples} x 512 tokens of {args.calib_text}")
    print(f"{'model':<10} {'perplexity':>10} {'decoder Linears':>15} {'decode tok/s':>13} {'quantize s':>11}")
    for name, (ppl, size, tps, _) in results.items():
        print(f"{name:<10} {ppl:>10.2f} {size / 2**20:>12.1f} MB {tps:>13.1f} {times.get(name, 0.0):>11.1f}")
    f_ppl, f_size, f_tps, _ = results["float32"]
    r_ppl = results[f"rtn g{args.group_size}"][0]
    q_ppl, q_size, q_tps, _ = results[f"awq g{args.group_size}"]
    print(f"AWQ: weights {f_size / q_size:.1f}x smaller, perplexity +{q_ppl - f_ppl:.2f} over float "
          f"(round-to-nearest: +{r_ppl - f_ppl:.2f}), decode {q_tps / f_tps:.2f}x float speed")
    for name, (*_, text) in results.items():
        print(f"\n[{name}] {prompt}\n  -> {text}")


if __name__ == "__main__":
    main()
