"""Number-format limits of the low-precision types torchprobe judges against."""
from __future__ import annotations

import math

from .errors import InvalidArgument

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP16_MIN_SUBNORMAL = 2.0**-24
BF16_MIN_NORMAL = 2.0**-126
BF16_MIN_SUBNORMAL = 2.0**-133


def headroom_bits(absmax: float) -> float:
    """Bits of FP16 range left above ``absmax``: log2(65504 / absmax); negative means overflow.

    ``inf`` for 0 (an all-zero tensor: nothing can overflow), ``-inf`` for an infinite absmax,
    and ``nan`` (undefined) for an undefined absmax: a tensor with no finite value has none.

    >>> round(headroom_bits(256.0), 4), headroom_bits(0.0), headroom_bits(float("nan"))
    (7.9993, inf, nan)
    """
    if absmax != absmax:  # NaN: undefined in, undefined out
        return float("nan")
    if absmax < 0:
        raise InvalidArgument(f"headroom_bits(absmax) takes an absolute value >= 0; got {absmax!r}")
    if absmax == 0.0:
        return float("inf")
    if math.isinf(absmax):
        return float("-inf")
    return math.log2(FP16_MAX / absmax)

# Risk thresholds: every place that judges FP16 risk reads them here.
LOW_HEADROOM_BITS = 1.0  # absmax above 32752: one doubling from FP16 overflow
HEAVY_UNDERFLOW = 0.01  # more than 1% of the non-zero values flush to zero in FP16
AUTOCAST_RULE_THRESHOLD = 512.0  # TensorRT / ModelOpt autocast keep FP32 where |x| > 512
