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

    One formula, three ways to compute it: on the CPU, float64 norms that stop early when both
    tensors are finite (reading a scalar costs nothing there); on CUDA, one Triton kernel that
    reads each tensor once (``_triton_error.py``); elsewhere, and for non-finite values on the
    CPU, the branch-free eager reference :func:`_error_vector_eager`. Tensor subclasses (DTensor)
    are reduced over this rank's values (:mod:`torchprobe.subclasses`).
    """
    if type(ref) is not Tensor or type(test) is not Tensor:
        from .subclasses import local_pair  # only for subclasses: DTensor and co.

        ref, test = local_pair(ref, test)
    if ref.shape != test.shape:
        raise InvalidArgument(f"shape mismatch: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")
    if ref.numel() == 0:
        return torch.zeros(VECTOR_LEN, dtype=torch.float64, device=ref.device)
    if ref.device.type == "cpu" and test.device.type == "cpu":
        vector = _error_vector_host(ref, test)
        if vector is not None:
            return vector
    elif ref.device.type == "cuda" and test.device == ref.device:
        vector = _error_vector_cuda(ref, test)
        if vector is not None:
            return vector
    return _error_vector_eager(ref, test)


def _error_vector_eager(ref: Tensor, test: Tensor) -> Tensor:
    """The reference formula: branch-free eager ops in float64, no host read."""
    r = ref.detach().to(torch.float64)
    t = test.detach().to(device=r.device, dtype=torch.float64)
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


def _error_vector_host(ref: Tensor, test: Tensor) -> Tensor | None:
    """CPU: float64 norms, in place on private float64 copies; None when a value is not finite
    (then the eager formula counts the NaN/Inf). <r, t> = (|r|^2 + |t|^2 - |t - r|^2) / 2, exact
    to float64 rounding since |t - r| is computed directly."""
    f64 = torch.float64
    r = ref.detach().reshape(-1).to(f64)
    t = test.detach().reshape(-1).to(f64, copy=True)
    rr = torch.linalg.vector_norm(r)
    tt = torch.linalg.vector_norm(t)
    if not (math.isfinite(rr) and math.isfinite(tt)):
        return None
    d = t.sub_(r)
    dd = torch.linalg.vector_norm(d).square()
    rr, tt = rr.square(), tt.square()
    zero = torch.zeros((), dtype=f64)
    return torch.stack([d.abs_().amax(), dd, rr, (rr + tt - dd) / 2, tt, zero, zero, zero])


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ERROR_BLOCK, _ERROR_WARPS, _ERROR_ROWS = 1024, 4, 1024
_error_kernel: object = None  # the Triton kernel once imported; False where Triton does not import
_error_compiled: dict[tuple, object] = {}
_error_rows: dict[torch.device, list] = {}  # device -> [float64 block of rows, rows used, max programs]


def _triton_error_kernel() -> object | None:
    global _error_kernel
    if _error_kernel is None:
        try:
            from ._triton_error import error_kernel
        except Exception:  # noqa: BLE001 - any import failure means: no fused kernel here
            error_kernel = False
        _error_kernel = error_kernel
    return _error_kernel or None


def _error_vector_cuda(ref: Tensor, test: Tensor) -> Tensor | None:
    """CUDA: one launch of the Triton kernel into a row of a preallocated float64 block (one
    allocation per 1024 vectors); None where it cannot run."""
    n = ref.numel()
    if ref.dtype not in _FUSED_DTYPES or test.dtype not in _FUSED_DTYPES or n >= 2**31 - 2**26:
        return None
    kernel = _triton_error_kernel()
    if kernel is None:
        return None
    device = ref.device
    rows = _error_rows.get(device)
    if rows is None or rows[1] == _ERROR_ROWS:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        rows = _error_rows[device] = [torch.zeros(_ERROR_ROWS, VECTOR_LEN, dtype=torch.float64, device=device), 0, 4 * sms]
    block, row, max_programs = rows
    rows[1] += 1
    r = ref.detach()
    t = test.detach()
    r = r if r.is_contiguous() else r.contiguous()
    t = t if t.is_contiguous() else t.contiguous()
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            launch_error_kernel(kernel, r, t, n, block, row, max_programs)
    else:
        launch_error_kernel(kernel, r, t, n, block, row, max_programs)
    return block[row]


def launch_error_kernel(kernel: object, r: Tensor, t: Tensor, n: int, block: Tensor, row: int, max_programs: int) -> None:
    """Add the error vector of (r, t) into ``block[row]`` (zeros before): one launch."""
    tiles = -(-n // _ERROR_BLOCK)
    programs = min(tiles, max_programs)
    args = (r, t, n, -(-tiles // programs), block, block.view(torch.int64), row)
    # The compiled kernel launched directly costs a fraction of the host time of JITFunction; it
    # is reused only for arguments Triton specializes the same way (dtypes, 16-byte alignment).
    key = (r.dtype, t.dtype, r.data_ptr() % 16 == 0, t.data_ptr() % 16 == 0, r.device)
    compiled = _error_compiled.get(key)
    if compiled is not None:
        try:
            compiled[(programs, 1, 1)](*args, _ERROR_BLOCK)
            return
        except Exception:  # noqa: BLE001 - a Triton without the direct launch: use the JIT path
            _error_compiled[key] = None
            compiled = None
    launched = kernel[(programs,)](*args, BLOCK=_ERROR_BLOCK, num_warps=_ERROR_WARPS)
    if key not in _error_compiled:
        _error_compiled[key] = launched


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


