"""awqtensor: activation-aware int4 weight quantization as a PyTorch tensor subclass."""

import logging


def _import_torchao_quietly() -> None:
    """torchao's import logs warnings a user cannot act on (CUDA-only extensions that a CPU
    build cannot load, torch's pytree deprecations); keep the first import silent."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
        try:  # transformers imports this on every from_pretrained; its enums log the deprecation
            import torchao.prototype.safetensors.safetensors_utils  # noqa: F401
        except ImportError:
            pass
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_import_torchao_quietly()

from .api import quantize_
from .autoawq import load_autoawq, save_autoawq
from .config import AWQConfig, RTNConfig, awq_config, gptq_config, rtn_config
from .fusion import fuse_
from .generation import fast_generate_, generate
from .gguf_export import save_gguf
from . import hf  # noqa: F401,E402  registers "awqtensor" with transformers' from_pretrained
from .head import Int8HeadTensor, quantize_head_
from .serialization import load_quantized, save_quantized
from .tensor import Int4AWQTensor

__all__ = ["quantize_", "fuse_", "quantize_head_", "generate", "fast_generate_", "awq_config", "gptq_config", "rtn_config",
           "AWQConfig", "RTNConfig", "Int4AWQTensor", "Int8HeadTensor", "save_quantized", "load_quantized",
           "save_autoawq", "load_autoawq", "save_gguf"]
__version__ = "0.1.0"
