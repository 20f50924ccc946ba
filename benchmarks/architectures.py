"""Float vs round-to-nearest vs AWQ on every architecture family awqtensor is checked on,
random-init from transformers configs (tests/families.py): post-LN encoder and decoder,
parallel-residual blocks, mixtures of experts, a vision-language model.

    python benchmarks/architectures.py --seeds 3

Per family and seed: calibrate AWQ on 32 x 64 random token ids, evaluate every model on
other random ids, and report the output's relative error to the float model (logits;
BERT's last hidden state) and, for the encoder, the mean-pooled embedding's cosine to
the float one. Also: how many Linears ended Int4AWQTensor, how many of them are routed
experts, and the AWQ time. Random-init models have no activation outliers, so AWQ's
gain over RTN here is small; this checks that AWQ is never the worse choice on any
block structure, not how much it helps a trained model (see perplexity.py for that).
Prints a table; writes benchmarks/results/architectures.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from families import VOCAB, build  # noqa: E402

from awqtensor import Int4AWQTensor, awq_config, quantize_, rtn_config  # noqa: E402
from awqtensor.moe import RoutedExperts  # noqa: E402
from common import cpu_device, provenance, write_csv  # noqa: E402

FAMILIES = ["llama", "bert", "opt-post-ln", "gptj", "phi", "falcon", "mixtral", "qwen2-moe", "qwen3-moe",
            "deepseek-v3", "llava"]
STRUCTURE = {"llama": "pre-LN decoder", "bert": "post-LN encoder", "opt-post-ln": "post-LN decoder",
             "gptj": "parallel residual", "phi": "parallel residual", "falcon": "parallel residual",
             "mixtral": "MoE", "qwen2-moe": "MoE + shared expert", "qwen3-moe": "MoE", "deepseek-v3": "MoE + shared, MLA",
             "llava": "vision-language"}


def ids(n, seq_len, seed):
    return torch.randint(0, VOCAB - 1, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs(model, batch):
    out = model(batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def measure(family: str, seed: int, group_size: int) -> dict:
    held = ids(4, 64, seed=1000 + seed)
    expected = outputs(build(family, seed), held)
    row = {"family": family, "structure": STRUCTURE[family], "seed": seed, "group_size": group_size}
    for method in ("rtn", "awq"):
        model = build(family, seed)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Linears outside the calibrated blocks"
            if method == "rtn":
                quantize_(model, rtn_config(group_size=group_size))
            else:
                quantize_(model, awq_config(group_size=group_size, n_samples=32, seq_len=64),
                          calibration_data=ids(32, 64, seed=seed))
        row[f"{method}_s"] = time.perf_counter() - start
        got = outputs(model, held)
        row[f"{method}_rel_error"] = ((got - expected).norm() / expected.norm()).item()
        if family == "bert":
            row[f"{method}_embedding_cosine"] = F.cosine_similarity(got.mean(1), expected.mean(1)).mean().item()
        quantized = [m for m in model.modules() if isinstance(m, nn.Linear) and isinstance(m.weight, Int4AWQTensor)]
        experts = {id(m) for r in model.modules() if isinstance(r, RoutedExperts) for m in r.modules()}
        row["int4_linears"] = len(quantized)
        row["int4_expert_linears"] = sum(id(m) in experts for m in quantized)
        row["float_3d_params"] = sum(p.dim() == 3 for p in model.parameters())
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=FAMILIES)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", default=str(Path(__file__).parent / "results" / "architectures.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(f, seed, args.group_size) for f in args.families for seed in range(args.seeds)]
    extra = {"device": cpu_device(args.threads), **provenance()}
    columns = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(Path(args.csv), [{**{k: r.get(k, "") for k in columns}, **extra} for r in rows])
    print("| family | structure | RTN rel. error | AWQ rel. error | AWQ / RTN | int4 Linears (experts) | "
          "3-D float params | AWQ s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for family in args.families:
        mine = [r for r in rows if r["family"] == family]
        mean = lambda key: sum(r[key] for r in mine) / len(mine)  # noqa: E731
        rtn, awq = mean("rtn_rel_error"), mean("awq_rel_error")
        note = ""
        if family == "bert":
            note = (f" (1 - embedding cosine: RTN {1 - mean('rtn_embedding_cosine'):.1e}, "
                    f"AWQ {1 - mean('awq_embedding_cosine'):.1e})")
        print(f"| {family} | {STRUCTURE[family]} | {rtn:.4f} | {awq:.4f}{note} | {awq / rtn:.2f}x | "
              f"{mine[0]['int4_linears']} ({mine[0]['int4_expert_linears']}) | {mine[0]['float_3d_params']} | "
              f"{mean('awq_s'):.1f} |")
    print(f"\n{len(rows)} rows -> {args.csv}")


if __name__ == "__main__":
    main()
