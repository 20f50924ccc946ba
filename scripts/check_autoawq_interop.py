"""Does AutoAWQ itself read what ``awqtensor.save_autoawq`` writes? Run in the AutoAWQ
environment of benchmarks/autoawq_reference.py (transformers 4.x + autoawq 0.2.9):

    .venv/bin/python scripts/check_autoawq_interop.py --write /tmp/tiny-awq       # awqtensor side
    .venv-autoawq/bin/python scripts/check_autoawq_interop.py --read /tmp/tiny-awq

The first writes a small random Llama quantized by awqtensor (group 32) as an AutoAWQ
checkpoint, with a few tokens and awqtensor's fp32 logits for them (safetensors). The
second builds the model from that config.json with AutoAWQ's own ``WQLinear_GEMM`` in
place of every quantized Linear (AutoAWQ's CPU loader insists on IPEX, so the modules
are placed by hand), loads the checkpoint strictly, and compares the logits. AutoAWQ
computes in fp16, so agreement is to fp16 precision.
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write(path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_llama

    from awqtensor import quantize_, rtn_config, save_autoawq

    model = tiny_llama(0)
    quantize_(model, rtn_config(group_size=32))
    save_autoawq(model, path)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(ids).logits.contiguous()}, str(path / "reference.safetensors"))
    print(f"wrote {path}")


def read(path: Path) -> None:
    from awq.modules.linear.gemm import WQLinear_GEMM
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = load_file(str(path / "reference.safetensors"))
    config = AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16).eval()
    skip = set(qc.get("modules_to_not_convert") or [])
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, torch.nn.Linear) and full not in skip:
                setattr(parent, child_name, WQLinear_GEMM(qc["bits"], qc["group_size"], child.in_features,
                                                          child.out_features, child.bias is not None, "cpu"))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    with torch.no_grad():
        out = model(ref["ids"]).logits.float()
    err = ((out - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
    print(f"AutoAWQ's WQLinear_GEMM vs awqtensor logits: max error {err:.2e} of the largest logit")
    if err > 5e-3:
        raise SystemExit("AutoAWQ computes something else from this checkpoint")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path)
    group.add_argument("--read", type=Path)
    args = parser.parse_args()
    write(args.write) if args.write else read(args.read)
