"""The kinds torchprobe reasons with, as enums (never substrings of evidence text).

They are ``str`` enums: ``Reason.OVERFLOW == "overflow"`` and ``str(Reason.OVERFLOW) == "overflow"``,
so JSON and user code that compares with strings keep working.

    >>> Reason("overflow") is Reason.OVERFLOW, str(ErrorKind.LOCAL)
    (True, 'local')
"""
from __future__ import annotations

from enum import Enum


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class ErrorKind(_StrEnum):
    """How a module's error was measured."""

    LOCAL = "local"  # the module alone under the target, on the reference's exact inputs
    PROPAGATED = "propagated"  # the whole model under the target, this module's output vs the reference


class Reason(_StrEnum):
    """Why a module is a culprit (or a latent finding), most severe first."""

    ERROR = "error"  # it fails to run under the target
    OVERFLOW = "overflow"  # values beyond the dtype's range: Inf
    NAN = "nan"  # NaN from finite inputs
    UNDERFLOW = "underflow"  # a large share of its values flush to zero
    LOCAL_ERROR = "local-error"  # its local error exceeds the tolerance

    @property
    def severity(self) -> int:
        return list(Reason).index(self)


class Risk(_StrEnum):
    """What makes one recorded FP32 tensor unsafe in FP16."""

    NAN = "nan"
    OVERFLOW = "overflow"
    LOW_HEADROOM = "low-headroom"
    UNDERFLOW = "underflow"


class FixOutcome(_StrEnum):
    """How a keep-FP32 search ended."""

    ALREADY_WITHIN = "already-within"  # nothing needs to stay in FP32
    FOUND = "found"  # a measured set meets the tolerance
    NO_SET_MEETS_TOL = "no-set-meets-tol"  # even keeping every candidate misses
    NO_CANDIDATE = "no-candidate"  # no module shows local error above tol
    REFERENCE_NOT_FINITE = "reference-not-finite"  # the FP32 reference itself holds NaN/Inf
