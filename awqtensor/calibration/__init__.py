"""The AWQ algorithm: blocks and their inputs (blocks), mapping discovery and folding
(mappings), the scale and clipping searches (search), the one-call driver (awq), the
prepare/convert path on running statistics (observe), calibration data (data)."""

from .awq import calibrate

__all__ = ["calibrate"]
