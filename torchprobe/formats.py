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

# Risk thresholds: every place that judges FP16 risk reads them here.
LOW_HEADROOM_BITS = 1.0  # absmax above 32752: one doubling from FP16 overflow
HEAVY_UNDERFLOW = 0.01  # more than 1% of the non-zero values flush to zero in FP16
AUTOCAST_RULE_THRESHOLD = 512.0  # TensorRT / ModelOpt autocast keep FP32 where |x| > 512
