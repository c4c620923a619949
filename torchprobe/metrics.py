"""Error metrics between a reference tensor and a test tensor, each knowing its own direction.

Every metric is a :class:`Metric` registered once in :data:`METRICS`; report, compare, isolate,
bisect, Monitor and the HTML page all ask it whether a value passes a tolerance. Both tensors are
upcast to float64 before differencing, whatever their dtype.

One meaning of ``tol`` per metric:

- ``max_abs``, ``rel_l2``: an error; passes when ``value <= tol``.
- ``cosine``: a similarity; passes when ``value >= 1 - tol`` (``tol=0.01``: cosine >= 0.99).
- ``sqnr``: signal-to-quantization-noise ratio in dB; passes when ``value >= tol``.

Non-finite values are never dropped: where one side has NaN/Inf and the other does not, distance
metrics are ``inf``, SQNR ``-inf`` and cosine ``nan``; where both sides have the same NaN/Inf the
value is ``nan`` (undefined), and a NaN never passes.

    >>> m = get_metric("cosine")
    >>> m.passes(0.26, 0.01), m.passes(0.995, 0.01)
    (False, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .errors import InvalidArgument

VECTOR_LEN = 8  # max_abs, |t-r|^2, |r|^2, <r,t>, |t|^2, non-finite mismatches, new non-finite, both non-finite


def error_vector(ref: Tensor, test: Tensor) -> Tensor:
    """Float64 reduction of (ref, test) on ref's device; read with :func:`from_vector`.

    Tensor subclasses (DTensor) are reduced over this rank's values (:mod:`torchprobe.distributed`)."""
    if type(ref) is not Tensor or type(test) is not Tensor:
        from .distributed import local_pair  # only for subclasses: DTensor and co.

        ref, test = local_pair(ref, test)
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
    same_nonfinite = ~r_fin & ~t_fin & ((torch.isnan(r) & torch.isnan(t)) | (r == t))
    mismatch = (r_fin != t_fin) | (~r_fin & ~t_fin & ~same_nonfinite)
    return torch.stack([
        d.abs().max(), d.square().sum(), r0.square().sum(), (r0 * t0).sum(), t0.square().sum(),
        mismatch.sum().double(), (r_fin & ~t_fin).sum().double(), same_nonfinite.sum().double(),
    ])


@dataclass(frozen=True)
class ErrorMetrics:
    """Every metric for one (reference, test) pair.

    ``nonfinite_mismatch``: positions where exactly one side is NaN/Inf (or both are, differently);
    ``nonfinite_both``: positions where both sides hold the same NaN/Inf.
    """

    max_abs: float
    rel_l2: float
    cosine: float
    sqnr: float
    nonfinite_mismatch: float
    nonfinite_both: float = 0.0

    def __getitem__(self, name: str) -> float:
        if name in self.__dataclass_fields__:
            return getattr(self, name)
        return getattr(self, get_metric(name).name)

    @property
    def finite(self) -> bool:
        """True when neither side holds a NaN/Inf."""
        return self.nonfinite_mismatch == 0 and self.nonfinite_both == 0


def from_vector(v: list[float] | Tensor) -> ErrorMetrics:
    max_abs, d2, r2, rt, t2, mismatch, _new, both = (float(x) for x in v)
    if mismatch:
        return ErrorMetrics(math.inf, math.inf, math.nan, -math.inf, mismatch, both)
    if both:
        return ErrorMetrics(math.nan, math.nan, math.nan, math.nan, 0.0, both)
    rel = 0.0 if d2 == 0.0 else (math.inf if r2 == 0.0 else math.sqrt(d2) / math.sqrt(r2))
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
    return ErrorMetrics(max_abs, rel, cos, sq, 0.0, 0.0)


def measure(ref: Tensor, test: Tensor) -> ErrorMetrics:
    """Every metric between ``ref`` and ``test`` (same shape, any floating dtype); one sync."""
    return from_vector(error_vector(ref, test).cpu().tolist())


@dataclass(frozen=True)
class Metric:
    """One metric: its name, direction, how ``tol`` bounds it, and its default tolerances.

    ``similarity`` metrics (cosine) pass at ``value >= 1 - tol``; ``higher_is_better`` ones that
    are not similarities (SQNR, dB) pass at ``value >= tol``; errors pass at ``value <= tol``.
    """

    name: str
    higher_is_better: bool = False
    similarity: bool = False
    defaults: Mapping[torch.dtype, float] | float = 1e-2
    unit: str = ""

    def __call__(self, ref: Tensor, test: Tensor) -> float:
        return getattr(measure(ref, test), self.name)

    def bound(self, tol: float) -> float:
        """The value a passing result must reach: ``1 - tol`` for similarities, else ``tol``."""
        return 1.0 - tol if self.similarity else tol

    def passes(self, value: float, tol: float) -> bool:
        if math.isnan(value):
            return False
        return value >= self.bound(tol) if self.higher_is_better else value <= self.bound(tol)

    def worse(self, a: float, b: float) -> bool:
        """True when ``a`` is a worse result than ``b`` (NaN is worst)."""
        if math.isnan(a):
            return not math.isnan(b)
        if math.isnan(b):
            return False
        return a < b if self.higher_is_better else a > b

    def worst(self, values: Iterable[float]) -> float:
        """The worst of several values (NaN when there are none)."""
        out = math.nan
        first = True
        for v in values:
            if first or self.worse(v, out):
                out, first = v, False
        return out

    def badness(self, value: float) -> float:
        """A number that grows as the result gets worse (for sorting and 'up is worse' plots)."""
        if math.isnan(value):
            return math.inf
        if self.similarity:
            return 1.0 - value
        return -value if self.higher_is_better else value

    def rule(self, tol: float) -> str:
        """The passing condition as text: ``rel_l2 <= 0.01``, ``cosine >= 0.99``."""
        op = ">=" if self.higher_is_better else "<="
        return f"{self.name} {op} {self.bound(tol):g}{self.unit}"

    def default_tol(self, dtype: torch.dtype) -> float:
        if isinstance(self.defaults, (int, float)):
            return float(self.defaults)
        return self.defaults.get(dtype, self.defaults[torch.float16])


_ERROR_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-6}
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("rel_l2", defaults=_ERROR_TOL),
        Metric("max_abs", defaults=_ERROR_TOL),
        Metric("cosine", higher_is_better=True, similarity=True, defaults=1e-4),
        Metric("sqnr", higher_is_better=True, defaults=20.0, unit=" dB"),
        Metric("nonfinite_mismatch", defaults=0.0),
    )
}


def get_metric(name: str | Metric) -> Metric:
    """The registered metric called ``name``."""
    if isinstance(name, Metric):
        return name
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise InvalidArgument(f"metric={name!r} is not known; valid metrics: {', '.join(sorted(METRICS))}") from None


def worst_value(metric: str | Metric, errors: Iterable[ErrorMetrics | None]) -> float:
    """The worst value of ``metric`` over several leaves (inf when a leaf has no metrics)."""
    m = get_metric(metric)
    return m.worst(math.inf if e is None else e[m.name] for e in errors)


def worst_of(metric: str | Metric, errors: list[ErrorMetrics | None]) -> ErrorMetrics | None:
    """The leaf with the worst ``metric`` (None when any leaf has no metrics)."""
    if not errors or any(e is None for e in errors):
        return None
    m = get_metric(metric)
    chosen = errors[0]
    for e in errors[1:]:
        if m.worse(e[m.name], chosen[m.name]):
            chosen = e
    return chosen


def all_pass(metric: str | Metric, errors: list[ErrorMetrics | None], tol: float) -> bool:
    """True when there is at least one leaf and every leaf is finite and within ``tol``."""
    m = get_metric(metric)
    return bool(errors) and all(e is not None and e.finite and m.passes(e[m.name], tol) for e in errors)


def check_tol(tol: float, argument: str = "tol") -> float:
    """``tol`` as a float, refused when it is not a positive finite number."""
    try:
        value = float(tol)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{argument}={tol!r} is not a number; give a positive float such as 1e-2") from None
    if math.isnan(value) or value <= 0:
        raise InvalidArgument(f"{argument}={tol!r}: a tolerance must be a positive finite number, such as 1e-2 "
                              "(inf accepts any finite error)")
    return value


def resolve_tol(tol: float | Mapping[str, float] | None, target: object, metric: str | Metric,
                dtype: torch.dtype | None = None, targets: Iterable[str] | None = None) -> float:
    """The tolerance for one target: the metric's default for the dtype, a float, or a dict by
    target string (targets missing from the dict get the default; keys that name no target of
    ``targets`` are refused)."""
    m = get_metric(metric)
    dtype = getattr(target, "dtype", dtype) or torch.float16
    if tol is None:
        return m.default_tol(dtype)
    if isinstance(tol, Mapping):
        if targets is not None:
            known = [str(t) for t in targets]
            unknown = [k for k in tol if str(k) not in known]
            if unknown:
                raise InvalidArgument(f"tol={{{unknown[0]!r}: ...}} names a target that is not among targets=; "
                                      f"valid keys: {', '.join(known)}")
        value = tol.get(str(target))
        return m.default_tol(dtype) if value is None else check_tol(value, f"tol[{str(target)!r}]")
    return check_tol(tol)


