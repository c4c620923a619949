"""Number-format limits of the low-precision types torchprobe judges against."""
from __future__ import annotations

import math

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP16_MIN_SUBNORMAL = 2.0**-24
BF16_MIN_NORMAL = 2.0**-126
BF16_MIN_SUBNORMAL = 2.0**-133


def headroom_bits(absmax: float) -> float:
    """Bits of FP16 range left above ``absmax``: log2(65504 / absmax); negative means overflow."""
    if absmax != absmax:  # NaN
        return float("nan")
    if absmax == 0.0:
        return float("inf")
    if math.isinf(absmax):
        return float("-inf")
    return math.log2(FP16_MAX / absmax)
