"""Error metrics between a reference tensor and a test tensor.

Every metric has one signature, ``(ref, test) -> float``, and is registered by name in
:data:`METRICS`. Both tensors are upcast to float64 before differencing, whatever their dtype.
Where the test has a NaN/Inf that the reference does not, distance metrics are ``inf``, SQNR is
``-inf`` and cosine is ``nan``: a non-finite result is never reported as a small error.

For many tensors, :func:`error_vector` reduces a pair on its device without a host sync and
:func:`from_vector` turns the read-back vector into :class:`ErrorMetrics`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from .errors import InvalidArgument

Metric = Callable[[Tensor, Tensor], float]
METRICS: dict[str, Metric] = {}
VECTOR_LEN = 7  # max_abs, |t-r|^2, |r|^2, <r,t>, |t|^2, nonfinite mismatches, new non-finite


def error_vector(ref: Tensor, test: Tensor) -> Tensor:
    """Float64 reduction of (ref, test) on ref's device; read with :func:`from_vector`."""
    if ref.shape != test.shape:
        raise InvalidArgument(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")
    r = ref.detach().to(torch.float64)
    t = test.detach().to(device=r.device, dtype=torch.float64)
    if r.numel() == 0:
        return torch.zeros(VECTOR_LEN, dtype=torch.float64, device=r.device)
    r_fin, t_fin = torch.isfinite(r), torch.isfinite(t)
    both = r_fin & t_fin
    r0, t0 = torch.where(both, r, 0.0), torch.where(both, t, 0.0)
    d = t0 - r0
    mismatch = (torch.isnan(r) != torch.isnan(t)) | (torch.isinf(r) != torch.isinf(t)) | (torch.isinf(r) & (r != t))
    return torch.stack([
        d.abs().max(), d.square().sum(), r0.square().sum(), (r0 * t0).sum(), t0.square().sum(),
        mismatch.sum().double(), (r_fin & ~t_fin).sum().double(),
    ])


@dataclass(frozen=True)
class ErrorMetrics:
    """Every metric for one (reference, test) pair."""

    max_abs: float
    rel_l2: float
    cosine: float
    sqnr: float
    nonfinite_mismatch: float

    def __getitem__(self, name: str) -> float:
        if name not in METRICS:
            get_metric(name)
        return getattr(self, name)

    @property
    def finite(self) -> bool:
        """True when the test adds no NaN/Inf and matches the reference's own non-finite values."""
        return self.nonfinite_mismatch == 0


def from_vector(v: list[float] | Tensor) -> ErrorMetrics:
    max_abs, d2, r2, rt, t2, mismatch, new_nonfinite = (float(x) for x in v)
    if new_nonfinite:
        return ErrorMetrics(math.inf, math.inf, math.nan, -math.inf, mismatch)
    rel = math.sqrt(d2) / max(math.sqrt(r2), 2.2e-308)
    if r2 == 0.0 and t2 == 0.0:
        cos = 1.0
    else:
        cos = rt / max(math.sqrt(r2) * math.sqrt(t2), 2.2e-308)
    if d2 == 0.0:
        sq = math.inf
    elif r2 == 0.0:
        sq = -math.inf
    else:
        sq = 10.0 * math.log10(r2 / d2)
    return ErrorMetrics(max_abs, rel, cos, sq, mismatch)


def measure(ref: Tensor, test: Tensor) -> ErrorMetrics:
    """Every metric between ``ref`` and ``test`` (same shape, any floating dtype); one sync."""
    return from_vector(error_vector(ref, test).cpu().tolist())


def _register(name: str) -> None:
    METRICS[name] = lambda ref, test: getattr(measure(ref, test), name)


for _f in fields(ErrorMetrics):
    _register(_f.name)


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise InvalidArgument(f"metric={name!r} is not known; valid metrics: {', '.join(sorted(METRICS))}") from None


def worse(name: str, a: float, b: float) -> bool:
    """True when value ``a`` of metric ``name`` is a worse error than ``b``."""
    if name in ("cosine", "sqnr"):
        return a < b or math.isnan(a)
    return a > b or math.isnan(a)


def within(name: str, value: float, tol: float) -> bool:
    """Whether a metric value passes a tolerance (cosine: >= 1 - tol; sqnr: >= tol dB)."""
    if math.isnan(value):
        return False
    if name == "cosine":
        return value >= 1.0 - tol
    if name == "sqnr":
        return value >= tol
    return value <= tol
