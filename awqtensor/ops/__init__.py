"""Custom ops (``torch.ops.awqtensor.*``), their reference and CPU implementations."""

from . import library  # noqa: F401  (registers the ops)
