"""Per-tensor statistics computed on the tensor's device, with no host synchronization.

:func:`summarize` reduces a tensor to a small float64 vector on its own device (a handful of
kernels in eager mode; one fused kernel when compiled on CUDA). Nothing is read back until
:func:`read` turns many vectors into :class:`TensorStats` with a single device-to-host copy.

Definitions (``a = |x|``):

- ``min``, ``max``, ``absmax``, ``mean``, ``rms`` are over finite values (non-finite ones count as 0).
- ``beyond_fp16``: finite values with ``a > 65504`` (they become Inf in FP16).
- ``subnormal_fp16``: non-zero values with ``a < 2**-14`` (FP16 subnormal or flushed);
  ``flush_fp16``: non-zero values with ``a < 2**-24``, below the smallest FP16 subnormal.
- ``subnormal_bf16`` / ``flush_bf16``: the same with ``2**-126`` / ``2**-133``; only for tensors
  wider than BF16 (FP32/FP64), None otherwise.
- ``headroom_bits``: ``log2(65504 / absmax)``; below 0 the tensor does not fit FP16.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Sequence

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


def _summary(x: Tensor, edges: Tensor) -> Tensor:
    """[min, max, sum, sumsq, bucket counts...] of a 1-D floating tensor, float64, on device."""
    wide = x if x.dtype == torch.float64 else x.float()
    finite = torch.nan_to_num(wide, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = torch.aminmax(finite)
    total = finite.sum()
    sumsq = torch.linalg.vector_norm(finite).square()
    magnitude = wide.abs().nan_to_num_(nan=-1.0, posinf=math.inf)
    counts = torch.bincount(torch.bucketize(magnitude, edges, right=True), minlength=_N_BUCKETS)
    head = torch.stack([lo, hi, total, sumsq]).double()
    return torch.cat([head, counts.double()])


_compiled: Callable[[Tensor, Tensor], Tensor] | None = None


def _fused_summary(x: Tensor, edges: Tensor) -> Tensor:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_summary, dynamic=True)
    return _compiled(x, edges)


class Summarizer:
    """Turns tensors into on-device summary vectors; caches the bucket edges per dtype/device.

    ``fused=None`` compiles the reduction into one kernel on CUDA (when Triton is available) and
    runs it eagerly elsewhere.
    """

    def __init__(self, fused: bool | None = None) -> None:
        self.fused = fused
        self._edges: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _use_fused(self, x: Tensor) -> bool:
        if self.fused is not None:
            return self.fused
        if x.device.type != "cuda":
            return False
        return importlib.util.find_spec("triton") is not None  # inductor's CUDA code generator

    def __call__(self, x: Tensor) -> Tensor | None:
        """Summary vector of a floating tensor (None for an empty one); never syncs."""
        if x.numel() == 0:
            return None
        flat = x.detach().reshape(-1)
        wide = torch.float64 if flat.dtype == torch.float64 else torch.float32
        key = (wide, flat.device)
        edges = self._edges.get(key)
        if edges is None:
            edges = self._edges[key] = _edges(wide, flat.device)
        with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
            if self._use_fused(flat):
                return _fused_summary(flat, edges)
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
    absmax = max(abs(lo), abs(hi))
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


def read(pending: Sequence[tuple[torch.dtype, tuple[int, ...], Tensor | None]]) -> list[TensorStats]:
    """Turn (dtype, shape, summary-vector) triples into TensorStats, one host copy per device."""
    vectors = [v for _, _, v in pending if v is not None]
    host: list[list[float]] = []
    if vectors:
        by_device: dict[torch.device, list[int]] = {}
        for i, v in enumerate(vectors):
            by_device.setdefault(v.device, []).append(i)
        host = [[]] * len(vectors)
        for idx in by_device.values():
            rows = torch.stack([vectors[i] for i in idx]).cpu().tolist()
            for i, row in zip(idx, rows):
                host[i] = row
    out, k = [], 0
    for dtype, shape, v in pending:
        if v is None:
            out.append(TensorStats(dtype=str(dtype).replace("torch.", ""), shape=shape, numel=math.prod(shape)))
        else:
            out.append(_from_vector(dtype, shape, host[k]))
            k += 1
    return out


def summarize_now(x: Tensor) -> TensorStats:
    """Statistics of one tensor, read immediately (syncs; for one-off use and tests)."""
    vector = Summarizer()(x) if x.is_floating_point() else None
    return read([(x.dtype, tuple(x.shape), vector)])[0]
