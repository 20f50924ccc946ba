"""llama.cpp as a peer in the same run: the bundled SmolLM2 GGUF requantized to Q4_0 by
llama.cpp's own quantizer, decoded greedily through llama-cpp-python.

    pip install -e ".[bench]"    # builds llama.cpp from source: a C++ compiler and cmake, ~3-5 min on 2 cores

The Q4_0 file is written once next to awqtensor's model cache. Timing follows
``decode.py``'s: ``t(n)`` is the prompt's prefill plus ``n`` greedy tokens, each token
one ``eval`` of llama.cpp and an argmax of its logits.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

from awqtensor import smollm2

QUANTS = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F32": "LLAMA_FTYPE_ALL_F32"}


def unavailable() -> str | None:
    """Why llama.cpp cannot run here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed: pip install -e '.[bench]' (it builds llama.cpp from source)"
    return None


def _quiet(llama_cpp) -> None:
    """llama.cpp logs every tensor it quantizes or loads; keep the benchmark's output readable."""
    callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
    _quiet.keep = callback  # the C side holds a pointer: keep the Python object alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p())


def gguf(quant: str) -> Path:
    """The bundled GGUF (Q4_1) requantized to ``quant`` by llama.cpp, made once."""
    import llama_cpp

    target = smollm2.cache_dir() / f"SmolLM2-135M-Instruct.{quant}.gguf"
    if target.is_file():
        return target
    _quiet(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant])
    params.allow_requantize = True  # the shipped file is Q4_1: llama.cpp dequantizes it first
    params.nthread = 2
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(smollm2.gguf_path()).encode(), str(tmp).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama.cpp could not quantize {smollm2.gguf_path()} to {quant}")
    tmp.rename(target)
    return target


def timer(quant: str, threads: int, context: int):
    """``timed(prompt_ids, n)``: seconds for the prompt's prefill and ``n`` greedy tokens."""
    import llama_cpp
    import numpy as np

    _quiet(llama_cpp)
    llm = llama_cpp.Llama(model_path=str(gguf(quant)), n_ctx=context, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    vocab = llm.n_vocab()

    def next_token() -> int:  # greedy on the last evaluated token's logits (a view, no copy)
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    def timed(prompt: list[int], n: int) -> float:
        t = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        for i in range(n):
            token = next_token()
            if i + 1 < n:
                llm.eval([token])
        return time.perf_counter() - t

    return timed
