"""awqtensor: activation-aware int4 weight quantization as a PyTorch tensor subclass."""

from .api import quantize_
from .autoawq import load_autoawq, save_autoawq
from .config import AWQConfig, RTNConfig, awq_config, rtn_config
from .fusion import fuse_
from .serialization import load_quantized, save_quantized
from .tensor import Int4AWQTensor

__all__ = ["quantize_", "fuse_", "awq_config", "rtn_config", "AWQConfig", "RTNConfig", "Int4AWQTensor",
           "save_quantized", "load_quantized", "save_autoawq", "load_autoawq"]
__version__ = "0.1.0"
