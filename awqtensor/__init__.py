"""awqtensor: activation-aware int4 weight quantization as a PyTorch tensor subclass."""

from .api import quantize_
from .config import AWQConfig, RTNConfig, awq_config, rtn_config
from .tensor import Int4AWQTensor

__all__ = ["quantize_", "awq_config", "rtn_config", "AWQConfig", "RTNConfig", "Int4AWQTensor"]
__version__ = "0.1.0"
