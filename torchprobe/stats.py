"""Per-tensor statistics computed on the tensor's device, with no host synchronization.

:func:`Summarizer` reduces a tensor to a small vector on its own device; nothing is read back until
:func:`read` turns many vectors into :class:`TensorStats` with one device-to-host copy per device.
Three ways to get the vector, chosen per tensor:

- **CUDA, Triton available** (fp16/bf16/fp32): one Triton kernel (``_triton_stats.py``) reads
  the tensor once and accumulates with atomics into a row of a preallocated int64 *slab* (1024
  rows per allocation). One launch per tensor, no temporaries, no host sync.
- **CPU**: eager ops that read the scalars as they go (a read is free on the CPU) and so skip the
  passes that cannot count anything: no NaN/Inf pass when min/max are finite, the sub-bucket
  search only over the few values below the FP16 normal range.
- **elsewhere** (CUDA without Triton, fp64 on CUDA, other devices) and ``fused=False``: branch-free
  eager ops (:func:`_summary`, the reference); no op in it reads back (``bincount`` would: its
  output size depends on the data, so the bucket histogram goes through ``histc``).

Definitions (``a = |x|``):

- ``min``, ``max``, ``absmax``, ``mean``, ``rms`` are over the finite values; a tensor with none
  (all NaN/Inf) has them undefined: NaN, and so is ``headroom_bits``.
- ``beyond_fp16``: finite values with ``a > 65504`` (they become Inf in FP16).
- ``subnormal_fp16``: non-zero values with ``a < 2**-14`` (FP16 subnormal or flushed);
  ``flush_fp16``: non-zero values with ``a < 2**-24``, below the smallest FP16 subnormal.
- ``subnormal_bf16`` / ``flush_bf16``: the same with ``2**-126`` / ``2**-133``; only for tensors
  wider than BF16 (FP32/FP64), None otherwise.
- ``headroom_bits``: ``log2(65504 / absmax)``; below 0 the tensor does not fit FP16; ``inf`` for
  an all-zero tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .formats import (
    BF16_MIN_NORMAL,
    BF16_MIN_SUBNORMAL,
    FP16_MAX,
    FP16_MIN_NORMAL,
    FP16_MIN_SUBNORMAL,
    headroom_bits,
)

# Bucket i of |x| (bucketize right=True against _EDGES): 0 NaN, 1 zero, 2 below bf16 subnormal,
# 3 bf16 subnormal, 4 below fp16 subnormal, 5 fp16 subnormal, 6 normal, 7 beyond fp16, 8 Inf.
_N_BUCKETS = 9
_VECTOR_LEN = 4 + _N_BUCKETS


def _edges(dtype: torch.dtype, device: torch.device) -> Tensor:
    smallest = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)).item()
    above_max = torch.nextafter(torch.tensor(FP16_MAX, dtype=dtype), torch.tensor(math.inf, dtype=dtype)).item()
    values = [0.0, smallest, BF16_MIN_SUBNORMAL, BF16_MIN_NORMAL, FP16_MIN_SUBNORMAL, FP16_MIN_NORMAL, above_max, math.inf]
    return torch.tensor(values, dtype=dtype, device=device)


_SUMSQ_ROW = 4096


def _sumsq(x: Tensor) -> Tensor:
    """Sum of squares of a 1-D tensor, as float64: accumulated per 4096-element row in the input's
    precision, then across rows in float64 (one FP32 ``vector_norm`` over the whole tensor drifts
    on the CPU: 7e-4 relative error at 10M elements, 7e-3 at 51M)."""
    rows = x.numel() // _SUMSQ_ROW
    cut = rows * _SUMSQ_ROW
    head = torch.linalg.vector_norm(x[:cut].view(rows, _SUMSQ_ROW), dim=1).double().square().sum()
    return head + torch.linalg.vector_norm(x[cut:]).double().square()


def _summary(x: Tensor, edges: Tensor) -> Tensor:
    """[min, max, sum, sumsq, bucket counts...] of a 1-D floating tensor, float64, on device.

    min/max are over the finite values (+inf/-inf when there is none); sum and sumsq count
    non-finite values as 0. Branch-free and sync-free: the reference formula, and the path where
    no kernel is fused."""
    wide = x if x.dtype == torch.float64 else x.float()
    is_finite = torch.isfinite(wide)
    finite = torch.where(is_finite, wide, 0.0)
    lo = torch.where(is_finite, wide, math.inf).amin()
    hi = torch.where(is_finite, wide, -math.inf).amax()
    total = finite.sum()
    sumsq = _sumsq(finite)
    magnitude = wide.abs().nan_to_num_(nan=-1.0, posinf=math.inf)
    bucket = torch.bucketize(magnitude, edges, right=True)
    if bucket.device.type == "cpu":
        counts = torch.bincount(bucket, minlength=_N_BUCKETS).double()
    else:  # bincount sizes its output from the data, which reads it back (a host sync)
        counts = torch.histc(bucket.double(), bins=_N_BUCKETS, min=0, max=_N_BUCKETS)
    head = torch.stack([lo.double(), hi.double(), total.double(), sumsq])
    return torch.cat([head, counts])


_HOST_SMALL = 1 << 14
_host_edges: dict[torch.dtype, np.ndarray] = {}


def _summary_host(x: Tensor) -> Tensor:
    """The vector of :func:`_summary` for a CPU tensor. A read costs nothing on the CPU, so the
    scalars are read as they come and the passes that cannot count anything are skipped; counting
    goes through NumPy, whose comparisons and ``count_nonzero`` are several times faster there,
    and small tensors are summed in float64 by NumPy (fewer calls: per-call overhead dominates)."""
    wide = x if x.dtype == torch.float64 else x.float()
    a = wide.numpy()
    n = a.size
    lo, hi = float(a.min()), float(a.max())  # NaN propagates: both finite means no NaN and no Inf
    nan = inf = 0
    finite = wide
    if not (math.isfinite(lo) and math.isfinite(hi)):
        is_finite = np.isfinite(a)
        nan = int(np.count_nonzero(np.isnan(a)))
        inf = n - nan - int(np.count_nonzero(is_finite))
        lo = float(np.min(a, where=is_finite, initial=math.inf))  # over the finite values only
        hi = float(np.max(a, where=is_finite, initial=-math.inf))
        finite = torch.nan_to_num(wide, nan=0.0, posinf=0.0, neginf=0.0)
        a = finite.numpy()
    if n <= _HOST_SMALL:
        a64 = a.astype(np.float64)
        total, sumsq = float(a64.sum()), float(np.dot(a64, a64))
    else:
        total, sumsq = float(finite.sum()), float(_sumsq(finite))
    magnitude = np.abs(a)
    beyond = int(np.count_nonzero(magnitude > FP16_MAX)) if max(-lo, hi, 0.0) > FP16_MAX else 0
    below_normal = magnitude < FP16_MIN_NORMAL  # zeros (true ones and non-finite set to 0) and tiny values
    counts = [0] * _N_BUCKETS
    counts[0], counts[7], counts[8] = nan, beyond, inf
    n_below = int(np.count_nonzero(below_normal))
    if n_below:
        zeros = int(np.count_nonzero(a == 0))
        counts[1] = zeros - nan - inf
        if n_below > zeros:  # tiny non-zero values: bucket them (few; indexing a dense mask is slow)
            tiny = magnitude[below_normal & (magnitude > 0)]
            edges = _host_edges.get(wide.dtype)
            if edges is None:
                edges = _host_edges[wide.dtype] = _edges(wide.dtype, wide.device).numpy()
            for i, c in enumerate(np.bincount(np.searchsorted(edges, tiny, side="right"), minlength=_N_BUCKETS).tolist()):
                counts[i] += c
    counts[6] = n - sum(counts)
    return torch.tensor([lo, hi, total, sumsq, *counts], dtype=torch.float64)


# -- one-kernel path (CUDA, Triton) ------------------------------------------------------------
# Slab row (int64[16]): 0 min key, 1 max key (order-preserving ints of the fp32 min and max of
# the finite values; the keys of +inf and -inf when there is none), 2 sum, 3 sum of squares
# (float64 bits, non-finite values counted as 0), 4..11 counts of |x| at or above the fp32 bit
# patterns of 2**-149 (non-zero), 2**-133, 2**-126, 2**-24, 2**-14, just above 65504, Inf, NaN;
# 12..15 unused. _decode_slab_rows reads this layout; a row whose counts say "no finite value"
# decodes to undefined (NaN) min/max whatever its keys hold.
_SLAB_WIDTH = 16
_SLAB_ROWS = 1024
_KEY_INIT = 1 << 40
_BLOCK = 512  # elements per load; each loop step loads four of them (measured best on an H100)
_WARPS = 4
_PROGRAMS_PER_SM = 4
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_kernel: Any = None
_compiled: dict[tuple, Any] = {}


def _triton_kernel() -> Any:
    """The Triton kernel, imported on first use; None where Triton does not import."""
    global _kernel
    if _kernel is None:
        try:
            from ._triton_stats import summary_kernel
        except Exception:  # noqa: BLE001 - any import failure means: no fused kernel here
            summary_kernel = False
        _kernel = summary_kernel
    return _kernel or None


class _Slab:
    """Accumulator rows on one device: one allocation (three fills) per 1024 summaries."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.block = self.block_f = torch.empty(0)
        self.used = _SLAB_ROWS
        self.max_programs = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count

    def take(self) -> int:
        if self.used == _SLAB_ROWS:
            block = torch.zeros(_SLAB_ROWS, _SLAB_WIDTH, dtype=torch.int64, device=self.device)
            block[:, 0].fill_(_KEY_INIT)
            block[:, 1].fill_(-_KEY_INIT)
            self.block, self.block_f, self.used = block, block.view(torch.float64), 0
        self.used += 1
        return self.used - 1


class SlabRow:
    """A summary still on the device: row ``index`` of ``block``; :func:`read` decodes it."""

    __slots__ = ("block", "index")

    def __init__(self, block: Tensor, index: int) -> None:
        self.block, self.index = block, index

    @property
    def device(self) -> torch.device:
        return self.block.device


def _launch(kernel: Any, x: Tensor, n: int, slab: _Slab, row: int) -> None:
    step = 4 * _BLOCK
    steps = -(-n // step)
    programs = min(steps, slab.max_programs)
    args = (x, n, n // step, -(-steps // programs), slab.block, slab.block_f, row)
    # Launching the compiled kernel directly costs ~13 us of host time against ~20 us through
    # JITFunction. It is reused only for arguments Triton specializes the same way: dtype, 16-byte
    # alignment of x, n divisible by 16 or equal to 1 (the other ints are do_not_specialize).
    key = (x.dtype, x.data_ptr() % 16 == 0, n % 16 == 0, n == 1)
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[(programs,)](*args, BLOCK=_BLOCK, num_warps=_WARPS)
    else:
        compiled[(programs, 1, 1)](*args, _BLOCK)


class Summarizer:
    """Turns tensors into on-device summaries; never syncs.

    ``fused=None`` (default): the Triton kernel on CUDA where Triton imports, the read-as-you-go
    eager path on CPU, branch-free eager ops elsewhere. ``fused=False``: branch-free eager ops
    everywhere (the reference). ``fused=True``: the Triton kernel where it can run (CUDA, Triton,
    fp16/bf16/fp32), the branch-free eager ops elsewhere.
    """

    def __init__(self, fused: bool | None = None) -> None:
        self.fused = fused
        self._edges: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._slabs: dict[torch.device, _Slab] = {}

    def __call__(self, x: Tensor) -> Tensor | SlabRow | None:
        """Summary of a floating tensor (None for an empty one): a float64 vector, or a
        :class:`SlabRow` from the Triton kernel; :func:`read` decodes both."""
        n = x.numel()
        if n == 0:
            return None
        device = x.device
        if self.fused is not False and device.type == "cuda" and x.dtype in _FUSED_DTYPES and n < 2**31 - 2**26:
            kernel = _triton_kernel()
            if kernel is not None:
                slab = self._slabs.get(device)
                if slab is None:
                    slab = self._slabs[device] = _Slab(device)
                row = slab.take()
                flat = x if x.is_contiguous() else x.contiguous()
                if device.index == torch.cuda.current_device():
                    _launch(kernel, flat, n, slab, row)
                else:
                    with torch.cuda.device(device):
                        _launch(kernel, flat, n, slab, row)
                return SlabRow(slab.block, row)
        flat = x.detach().reshape(-1)
        if self.fused is None and device.type == "cpu":
            return _summary_host(flat)
        wide = torch.float64 if flat.dtype == torch.float64 else torch.float32
        key = (wide, device)
        edges = self._edges.get(key)
        if edges is None:
            edges = self._edges[key] = _edges(wide, device)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return _summary(flat, edges)


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor. Float fields are None for integer/bool tensors."""

    dtype: str
    shape: tuple[int, ...]
    numel: int
    min: float | None = None
    max: float | None = None
    absmax: float | None = None
    mean: float | None = None
    rms: float | None = None
    nan: int | None = None
    inf: int | None = None
    beyond_fp16: int | None = None
    subnormal_fp16: int | None = None
    flush_fp16: int | None = None
    subnormal_bf16: int | None = None
    flush_bf16: int | None = None
    headroom_bits: float | None = None

    @property
    def is_floating(self) -> bool:
        return self.absmax is not None

    @property
    def nonfinite(self) -> int:
        return (self.nan or 0) + (self.inf or 0)


def _from_vector(dtype: torch.dtype, shape: tuple[int, ...], v: Sequence[float]) -> TensorStats:
    lo, hi, total, sumsq = v[:4]
    b = [int(c) for c in v[4:]]
    finite = b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + b[7]
    if not finite:  # all NaN/Inf: no finite value to take a min, max, mean or rms of
        lo = hi = total = sumsq = math.nan
    absmax = max(abs(lo), abs(hi)) if finite else math.nan
    wide = dtype in (torch.float32, torch.float64)
    return TensorStats(
        dtype=str(dtype).replace("torch.", ""),
        shape=shape,
        numel=sum(b),
        min=lo,
        max=hi,
        absmax=absmax,
        mean=total / finite if finite else math.nan,
        rms=math.sqrt(sumsq / finite) if finite else math.nan,
        nan=b[0],
        inf=b[8],
        beyond_fp16=b[7],
        subnormal_fp16=b[2] + b[3] + b[4] + b[5],
        flush_fp16=b[2] + b[3] + b[4],
        subnormal_bf16=b[2] + b[3] if wide else None,
        flush_bf16=b[2] if wide else None,
        headroom_bits=headroom_bits(absmax),
    )


def _decode_slab_rows(rows: Tensor, numels: Sequence[int]) -> list[list[float]]:
    """Slab rows (host int64, k x 16) -> the vectors of :func:`_summary`."""
    keys = rows[:, :2].to(torch.int32)
    lohi = (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(torch.float32).double()
    sums = rows[:, 2:4].contiguous().view(torch.float64)
    c = rows[:, 4:12]  # counts of |x| at or above each edge
    n = torch.tensor(numels, dtype=torch.int64)
    counts = torch.stack([c[:, 7], n - c[:, 0], c[:, 0] - c[:, 1], c[:, 1] - c[:, 2], c[:, 2] - c[:, 3],
                          c[:, 3] - c[:, 4], c[:, 4] - c[:, 5], c[:, 5] - c[:, 6], c[:, 6] - c[:, 7]], dim=1)
    return torch.cat([lohi, sums, counts.double()], dim=1).tolist()


def to_host(vectors: Sequence[Tensor]) -> list[list[float]]:
    """Small device vectors as host lists, with one stack-and-copy per device."""
    out: list[list[float]] = [[] for _ in vectors]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(vectors):
        by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        for i, row in zip(idx, torch.stack([vectors[i] for i in idx]).cpu().tolist()):
            out[i] = row
    return out


def read(pending: Sequence[tuple[torch.dtype, tuple[int, ...], Tensor | SlabRow | None]]) -> list[TensorStats]:
    """Turn (dtype, shape, summary) triples into TensorStats: one host copy per device for the
    eager vectors, one gather and copy per slab block for the Triton rows."""
    vectors: list[int] = []
    slab_rows: dict[int, tuple[Tensor, list[int]]] = {}
    for i, (_, _, v) in enumerate(pending):
        if isinstance(v, SlabRow):
            slab_rows.setdefault(id(v.block), (v.block, []))[1].append(i)
        elif v is not None:
            vectors.append(i)
    host: dict[int, list[float]] = dict(zip(vectors, to_host([pending[i][2] for i in vectors])))
    for block, idx in slab_rows.values():  # copy the used rows of each block, pick on the host
        where = [pending[i][2].index for i in idx]
        rows = block[: max(where) + 1].cpu()[where]
        host.update(zip(idx, _decode_slab_rows(rows, [math.prod(pending[i][1]) for i in idx])))
    out = []
    for i, (dtype, shape, v) in enumerate(pending):
        if v is None:
            out.append(TensorStats(dtype=str(dtype).replace("torch.", ""), shape=shape, numel=math.prod(shape)))
        else:
            out.append(_from_vector(dtype, shape, host[i]))
    return out


def summarize_now(x: Tensor) -> TensorStats:
    """Statistics of one tensor, read immediately (syncs; for one-off use and tests)."""
    vector = Summarizer()(x) if x.is_floating_point() else None
    return read([(x.dtype, tuple(x.shape), vector)])[0]
