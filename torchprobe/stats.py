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
import threading
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


_CHUNK = 1 << 18  # elements per step of the host counting loop (it and its scratch stay in the L2)
_DOT_CHUNK = 1 << 16  # elements per float32 dot product (one over 1M elements drifts by 2e-6)
_scratch = threading.local()


def _buffers(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's reusable scratch for one chunk: |x|, and two masks (no allocation per tensor:
    fresh large temporaries cost page faults, and their churn slowed the model's own kernels)."""
    key = np.dtype(dtype).char
    bufs = getattr(_scratch, key, None)
    if bufs is None:
        bufs = (np.empty(_CHUNK, dtype=dtype), np.empty(_CHUNK, dtype=bool), np.empty(_CHUNK, dtype=bool))
        setattr(_scratch, key, bufs)
    return bufs


def _host_sumsq(x: Tensor) -> float:
    """Sum of squares of a 1-D CPU tensor, accumulated in float64 over float32 dot products of at
    most 65536 elements each (torch's dot runs on the forward's own threads; NumPy's ``dot``
    would wake OpenBLAS's thread pool, whose spinning workers then slow the model's kernels)."""
    if x.numel() <= _DOT_CHUNK:
        return float(torch.dot(x, x))
    return math.fsum(float(torch.dot(c, c)) for c in x.split(_DOT_CHUNK))


_T14, _T24, _T126, _T133 = FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, BF16_MIN_NORMAL, BF16_MIN_SUBNORMAL


def _below(m: np.ndarray, below14: int, zeros: int, out: np.ndarray, counts: list[int]) -> None:
    """Add the counts of buckets 2..5 of magnitudes ``m`` (``below14`` of them under 2**-14,
    ``zeros`` of them 0), by counting under each lower edge, and only while some are left."""
    n24 = int(np.count_nonzero(np.less(m, _T24, out=out))) if below14 > zeros else zeros
    n126 = int(np.count_nonzero(np.less(m, _T126, out=out))) if n24 > zeros else zeros
    n133 = int(np.count_nonzero(np.less(m, _T133, out=out))) if n126 > zeros else zeros
    counts[2] += n133 - zeros
    counts[3] += n126 - n133
    counts[4] += n24 - n126
    counts[5] += below14 - n24


def _walk(a: np.ndarray, signless: bool, near_zero: bool, big: bool) -> list[int]:
    """[zeros, beyond FP16, buckets 2..5] of one stretch of a finite array, chunk by chunk."""
    out = [0] * 6
    counts = [0] * _N_BUCKETS
    mag, below, other = _buffers(a.dtype)
    for i in range(0, a.size, _CHUNK):
        c = a[i:i + _CHUNK]
        k = c.size
        m = c if signless else np.abs(c, out=mag[:k])
        if big:
            out[1] += int(np.count_nonzero(np.greater(m, FP16_MAX, out=other[:k])))
        if not near_zero:
            continue
        b = np.less(m, _T14, out=below[:k])
        nb = int(np.count_nonzero(b))
        if not nb:
            continue
        if nb * 8 <= k:  # few: count over the gathered ones
            sub = m[b]
            z = nb - int(np.count_nonzero(sub))
            _below(sub, nb, z, np.empty(nb, dtype=bool), counts)
        else:  # many (zeros after a ReLU, tiny values after a GELU): count over the chunk
            z = int(np.count_nonzero(np.equal(m, 0, out=other[:k])))
            _below(m, nb, z, other[:k], counts)
        out[0] += z
    out[2:] = counts[2:6]
    return out


_POOL_MIN = 1 << 19  # tensors at least this large are counted on several threads (0: never)
_pool: Any = None


def _pieces(n: int) -> int:
    """How many threads count a tensor of ``n`` elements: the forward's intra-op threads, each
    given at least 2**17 elements (below that a hand-off costs more than it saves)."""
    if not _POOL_MIN or n < _POOL_MIN:
        return 1
    return max(1, min(torch.get_num_threads(), n >> 17))


_TORCH_COUNTS_MIN = 0  # with several threads, tensors this large are counted by torch ops (0: never)


def _torch_counts(x: Tensor, lo: float, hi: float, counts: list[int]) -> None:
    """:func:`_host_counts` through torch's own (multi-threaded) comparisons and counts."""
    n = x.numel()
    replaced = counts[0] + counts[8]
    if lo > hi:
        return
    big = max(-lo, hi) > FP16_MAX
    near_zero = lo < _T14 and hi > -_T14
    zeros = 0 if near_zero else replaced
    if near_zero or big:
        m = x if lo >= 0 else x.abs()
        if big:
            counts[7] = int(torch.count_nonzero(m > FP16_MAX))
        if near_zero:
            nb = int(torch.count_nonzero(m < _T14))
            zeros = n - int(torch.count_nonzero(m)) if nb else 0
            n24 = int(torch.count_nonzero(m < _T24)) if nb > zeros else zeros
            n126 = int(torch.count_nonzero(m < _T126)) if n24 > zeros else zeros
            n133 = int(torch.count_nonzero(m < _T133)) if n126 > zeros else zeros
            counts[2] += n133 - zeros
            counts[3] += n126 - n133
            counts[4] += n24 - n126
            counts[5] += nb - n24
    counts[1] = zeros - replaced
    counts[6] = n - sum(counts)


def _host_counts(a: np.ndarray, lo: float, hi: float, counts: list[int]) -> None:
    """Bucket counts 1..7 of a finite 1-D array (non-finite values already replaced by 0 and
    counted in ``counts[0]``/``counts[8]``; they are taken back out of the zeros here).

    One walk over the array in L2-sized chunks; each chunk is read by two cheap NumPy passes
    (|x|, one comparison with 2**-14, and a count of the mask) and, only where values under
    2**-14 exist, one count per lower bucket edge while some are left (over the few such values
    when they are few). The passes that cannot count anything, given min and max, are skipped.
    A large tensor is split over as many threads as the forward uses (NumPy releases the GIL in
    these loops)."""
    global _pool
    n = a.size
    replaced = counts[0] + counts[8]  # non-finite values, set to 0 in ``a``
    if lo > hi:  # no finite value at all
        return
    big = max(-lo, hi) > FP16_MAX
    near_zero = lo < _T14 and hi > -_T14  # some finite |x| may be below 2**-14
    zeros = 0 if near_zero else replaced  # the walk counts every zero; else the replaced ones are all
    if near_zero or big:
        parts = _pieces(n)
        if parts == 1:
            found = _walk(a, lo >= 0, near_zero, big)
        else:
            if _pool is None or _pool._max_workers < parts - 1:
                from concurrent.futures import ThreadPoolExecutor

                if _pool is not None:
                    _pool.shutdown(wait=False)
                _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="torchprobe-counts")
            step = -(-n // parts)
            futures = [_pool.submit(_walk, a[i:i + step], lo >= 0, near_zero, big) for i in range(step, n, step)]
            found = _walk(a[:step], lo >= 0, near_zero, big)
            for f in futures:
                found = [x + y for x, y in zip(found, f.result())]
        zeros += found[0]
        counts[7] = found[1]
        for i in range(4):
            counts[2 + i] += found[2 + i]
    counts[1] = zeros - replaced
    counts[6] = n - sum(counts)


def _summary_host(x: Tensor) -> list[float]:
    """The vector of :func:`_summary` for a 1-D CPU tensor, as a host list. A read costs nothing
    on the CPU, so the scalars are read as they come and the passes that cannot count anything are
    skipped. min/max and the sums are torch reductions (they run on the threads the forward uses);
    the counts walk the tensor once in L2-sized chunks with NumPy (its comparisons and
    ``count_nonzero`` are several times faster than torch's there). No temporaries beyond one
    chunk's scratch, no BLAS call of NumPy's."""
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n = wide.numel()
    if n <= _DOT_CHUNK:  # small: NumPy's reductions cost less to call than torch's
        a = wide.numpy()
        lo, hi = float(a.min()), float(a.max())
    else:  # large: torch's run on the forward's threads
        lo_t, hi_t = torch.aminmax(wide)
        lo, hi = lo_t.item(), hi_t.item()  # NaN propagates: both finite means no NaN and no Inf
    counts = [0] * _N_BUCKETS
    finite = wide
    if not (math.isfinite(lo) and math.isfinite(hi)):
        a = wide.numpy()
        is_finite = np.isfinite(a)
        counts[0] = int(np.count_nonzero(np.isnan(a)))
        counts[8] = n - counts[0] - int(np.count_nonzero(is_finite))
        lo = float(np.min(a, where=is_finite, initial=math.inf))  # over the finite values only
        hi = float(np.max(a, where=is_finite, initial=-math.inf))
        finite = torch.nan_to_num(wide, nan=0.0, posinf=0.0, neginf=0.0)
    total = float(finite.sum())  # torch's cascade sum: ~1e-7 relative at any size
    sumsq = _host_sumsq(finite)
    if _TORCH_COUNTS_MIN and n >= _TORCH_COUNTS_MIN and torch.get_num_threads() > 1:
        _torch_counts(finite, lo, hi, counts)
    else:
        _host_counts(finite.numpy(), lo, hi, counts)
    return [lo, hi, total, sumsq, *map(float, counts)]


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
_LIMIT = 2**31 - 2**26  # int32 offsets inside the kernel
# Per dtype: (FMT, elements per load, warps, programs per SM); the fastest of a sweep on an H200
# (benchmarks/overhead.py --tune). Four loads per loop step; the programs of one launch are all
# resident at once.
_CONFIG: dict[torch.dtype, tuple[int, int, int, int]] = {
    torch.float32: (0, 512, 4, 8),
    torch.float16: (1, 512, 4, 8),
    torch.bfloat16: (2, 512, 4, 8),
}
_FUSED_DTYPES = tuple(_CONFIG)
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

    def __init__(self, index: int) -> None:
        self.device = torch.device("cuda", index)
        self.block = torch.empty(0)
        self.ptr = 0
        self.used = _SLAB_ROWS
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count

    def grow(self) -> None:
        """A fresh block of rows (the summarizer takes them one by one: ``used`` counts them)."""
        block = torch.zeros(_SLAB_ROWS, _SLAB_WIDTH, dtype=torch.int64, device=self.device)
        block[:, 0].fill_(_KEY_INIT)
        block[:, 1].fill_(-_KEY_INIT)
        self.block, self.ptr, self.used = block, block.data_ptr(), 0


class SlabRow:
    """A summary still on the device: row ``index`` of ``block``; :func:`read` decodes it."""

    __slots__ = ("block", "index")

    def __init__(self, block: Tensor, index: int) -> None:
        self.block, self.index = block, index

    @property
    def device(self) -> torch.device:
        return self.block.device


class _NoHooks:
    calls: tuple = ()


class _Direct:
    """One compiled specialization of the kernel, launched through Triton's own C launcher with
    plain integers: a few us of host time per launch instead of ~13 us through ``CompiledKernel``
    (which looks up the device and the stream, builds launch metadata and calls the launch-hook
    chains every time, and resolves each pointer argument through ``data_ptr()`` and
    ``cuPointerGetAttribute``).

    Built only when the launcher has the shape this code was written against (Triton 3.x's
    ``CudaLauncher``, no scratch memory); used only while no launch hook is registered (a
    profiler such as proton): otherwise the kernel goes through Triton's public launch path."""

    __slots__ = ("launch", "function", "packed", "cooperative", "pdl", "enter", "exit")

    @classmethod
    def of(cls, compiled: Any) -> "_Direct | None":
        try:
            from triton import knobs

            run = compiled.run  # loads the module on the current device
            if run.global_scratch_size or run.profile_scratch_size or not callable(run.launch):
                return None
            hooks = [knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook]
            hooks = [_NoHooks() if h is None else h for h in hooks]
            if not all(isinstance(getattr(h, "calls", None), (list, tuple)) for h in hooks):
                return None  # hooks of a shape this code does not know: always the public path
            direct = cls()
            direct.launch, direct.function, direct.packed = run.launch, compiled.function, compiled.packed_metadata
            direct.cooperative, direct.pdl = run.launch_cooperative_grid, run.launch_pdl
            direct.enter, direct.exit = hooks
            return direct
        except Exception:  # noqa: BLE001 - another Triton: fall back to its public launch path
            return None


def _launch(kernel: Any, x: Tensor, n: int, slab: _Slab, row: int, index: int) -> None:
    config = _CONFIG[x.dtype]
    fmt, block, warps, per_sm = config
    step = 4 * block
    steps = -(-n // step)
    programs = min(steps, per_sm * slab.sms)
    full, iters = n // step, -(-steps // programs)
    ptr = x.data_ptr()
    # Triton specializes on: dtype, 16-byte alignment of x, n divisible by 16 or equal to 1 (the
    # other ints are do_not_specialize); one compiled kernel per such key, launch shape and device.
    key = (x.dtype, (ptr & 15 == 0) + 2 * (n & 15 == 0) + 4 * (n == 1), index, config)
    direct = _compiled.get(key)
    if direct is not None and not direct.enter.calls and not direct.exit.calls:
        try:
            direct.launch(programs, 1, 1, torch._C._cuda_getCurrentRawStream(index), direct.function, direct.cooperative,
                          direct.pdl, None, None, direct.packed, None, None, None,
                          ptr, n, full, iters, slab.ptr, slab.ptr, row, block, fmt)
            return
        except TypeError:  # the launcher parses its arguments before launching: another layout
            _compiled[key] = None
    args = (x, n, full, iters, slab.block, slab.block.view(torch.float64), row)
    public = _compiled.get(key + ("public",))
    if public is not None:  # no direct launcher for this Triton, or a launch hook is registered
        public[(programs, 1, 1)](*args, block, fmt)
        return
    compiled = kernel[(programs,)](*args, BLOCK=block, FMT=fmt, num_warps=warps)
    _compiled[key] = _Direct.of(compiled)
    _compiled[key + ("public",)] = compiled


def _dense(x: Tensor) -> bool:
    """True when ``x`` occupies one dense block of memory starting at ``x.data_ptr()``
    (contiguous, channels-last, any permutation of a contiguous tensor). The statistics do not
    depend on the order of the elements, so such a tensor is read as it lies, with no copy."""
    if x.is_contiguous():
        return True
    expect = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return True


class Summarizer:
    """Turns tensors into summaries; never syncs a device.

    ``fused=None`` (default): the Triton kernel on CUDA where Triton imports, the host path on the
    CPU (:func:`_summary_host`, summary read as it is made), branch-free eager ops elsewhere.
    ``fused=False``: branch-free eager ops everywhere (the reference). ``fused=True``: the Triton
    kernel where it can run (CUDA, Triton, fp16/bf16/fp32), the branch-free eager ops elsewhere.
    """

    def __init__(self, fused: bool | None = None) -> None:
        self.fused = fused
        self._edges: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._slabs: dict[int, _Slab] = {}

    def __call__(self, x: Tensor) -> Tensor | SlabRow | list[float] | None:
        """Summary of a floating tensor (None for an empty one): a float64 vector on the device,
        a :class:`SlabRow` from the Triton kernel, or a host list (CPU); :func:`read` decodes all."""
        n = x.numel()
        if n == 0:
            return None
        if x.is_cuda and self.fused is not False and x.dtype in _CONFIG and n < _LIMIT:
            kernel = _kernel if _kernel is not None else _triton_kernel()
            if kernel:
                index = x.get_device()
                slab = self._slabs.get(index)
                if slab is None:
                    slab = self._slabs[index] = _Slab(index)
                if slab.used == _SLAB_ROWS:
                    slab.grow()
                row = slab.used
                slab.used = row + 1
                if not (x.is_contiguous() or _dense(x)):
                    x = x.detach().contiguous()
                if index == torch._C._cuda_getDevice():
                    _launch(kernel, x, n, slab, row, index)
                else:
                    with torch.cuda.device(index):
                        _launch(kernel, x, n, slab, row, index)
                return SlabRow(slab.block, row)
        x = x.detach()
        flat = x.as_strided((n,), (1,)) if _dense(x) else x.reshape(-1)
        if self.fused is None and x.device.type == "cpu":
            return _summary_host(flat)
        device = x.device
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


_DTYPE_NAMES: dict[torch.dtype, str] = {}
_WIDE = (torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


def _from_vector(dtype: torch.dtype, shape: tuple[int, ...], v: Sequence[float]) -> TensorStats:
    lo, hi, total, sumsq = v[0], v[1], v[2], v[3]
    b0, b1, b2, b3, b4, b5, b6, b7, b8 = map(int, v[4:13])
    finite = b1 + b2 + b3 + b4 + b5 + b6 + b7
    if finite:
        absmax = max(abs(lo), abs(hi))
        mean, rms = total / finite, math.sqrt(sumsq / finite)
    else:  # all NaN/Inf: no finite value to take a min, max, mean or rms of
        lo = hi = absmax = mean = rms = math.nan
    wide = dtype in _WIDE
    # A frozen dataclass built field by field through its __init__ costs ~3 us; a read makes one
    # per recorded tensor, so the instance dict is filled directly (same fields, same values).
    stats = object.__new__(TensorStats)
    stats.__dict__.update(
        dtype=_dtype_name(dtype), shape=shape, numel=finite + b0 + b8, min=lo, max=hi, absmax=absmax, mean=mean,
        rms=rms, nan=b0, inf=b8, beyond_fp16=b7, subnormal_fp16=b2 + b3 + b4 + b5, flush_fp16=b2 + b3 + b4,
        subnormal_bf16=b2 + b3 if wide else None, flush_bf16=b2 if wide else None, headroom_bits=headroom_bits(absmax))
    return stats


def _decode_slab_array(rows: Tensor, numels: Sequence[int]) -> np.ndarray:
    """Slab rows (host int64, k x 16) -> the vectors of :func:`_summary` (k x 13 float64)."""
    r = rows.numpy()
    keys = r[:, :2].astype(np.int32)
    lohi = (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(np.float32).astype(np.float64)
    sums = np.ascontiguousarray(r[:, 2:4]).view(np.float64)
    c = r[:, 4:12]  # counts of |x| at or above each edge
    n = np.asarray(numels, dtype=np.int64)
    counts = np.stack([c[:, 7], n - c[:, 0], c[:, 0] - c[:, 1], c[:, 1] - c[:, 2], c[:, 2] - c[:, 3],
                       c[:, 3] - c[:, 4], c[:, 4] - c[:, 5], c[:, 5] - c[:, 6], c[:, 6] - c[:, 7]], 1)
    return np.concatenate([lohi, sums, counts.astype(np.float64)], 1)


def _decode_slab_rows(rows: Tensor, numels: Sequence[int]) -> list[list[float]]:
    """Slab rows (host int64, k x 16) -> the vectors of :func:`_summary`, as lists."""
    return _decode_slab_array(rows, numels).tolist()


def to_host(vectors: Sequence[Tensor | list[float]]) -> list[list[float]]:
    """Small device vectors as host lists, with one stack-and-copy per device (host lists as they are)."""
    out: list[list[float]] = [[] for _ in vectors]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(vectors):
        if type(v) is list:  # a host summary (the CPU path) is already there
            out[i] = v
            continue
        by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        for i, row in zip(idx, torch.stack([vectors[i] for i in idx]).cpu().tolist()):
            out[i] = row
    return out


_FLOAT_FIELDS = ("min", "max", "absmax", "mean", "rms")
_COUNT_FIELDS = ("numel", "nan", "inf", "beyond_fp16", "subnormal_fp16", "flush_fp16", "subnormal_bf16", "flush_bf16")


def _stats_of(dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[int, ...]], v: np.ndarray) -> list[TensorStats]:
    """TensorStats of many vectors (k x 13 float64, the layout of :func:`_summary`) at once: the
    derived fields are computed for all rows together, each row then costs one dict (the same
    values as :func:`_from_vector`, a third of its cost)."""
    lo, hi, total, sumsq = v[:, 0], v[:, 1], v[:, 2], v[:, 3]
    b = v[:, 4:13].astype(np.int64)
    finite = b[:, 1:8].sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        floats = np.stack([lo, hi, np.maximum(np.abs(lo), np.abs(hi)), total / finite, np.sqrt(sumsq / finite)], 1)
    floats[finite == 0] = math.nan  # no finite value: undefined
    sub = b[:, 2:6].cumsum(1)  # below bf16 subnormal, + bf16 subnormal, + below fp16 subnormal, + fp16 subnormal
    counts = np.stack([finite + b[:, 0] + b[:, 8], b[:, 0], b[:, 8], b[:, 7], sub[:, 3], sub[:, 2], sub[:, 1], sub[:, 0]], 1)
    out = []
    new = object.__new__
    for dtype, shape, f, c in zip(dtypes, shapes, floats.tolist(), counts.tolist()):
        d = dict(zip(_FLOAT_FIELDS, f))
        d.update(zip(_COUNT_FIELDS, c))
        d["dtype"], d["shape"], d["headroom_bits"] = _dtype_name(dtype), shape, headroom_bits(d["absmax"])
        if dtype not in _WIDE:
            d["subnormal_bf16"] = d["flush_bf16"] = None
        stats = new(TensorStats)  # a frozen dataclass: filled through its instance dict, see _from_vector
        stats.__dict__.update(d)
        out.append(stats)
    return out


def read(pending: Sequence[tuple[torch.dtype, tuple[int, ...], Tensor | SlabRow | list[float] | None]]) -> list[TensorStats]:
    """Turn (dtype, shape, summary) triples into TensorStats: host lists as they are, one host
    copy per device for the eager vectors, one gather and copy per slab block for the Triton rows."""
    vectors: list[int] = []
    slab_rows: dict[int, tuple[Tensor, list[int]]] = {}
    host: dict[int, Any] = {}
    for i, (_, _, v) in enumerate(pending):
        if type(v) is SlabRow:
            slab_rows.setdefault(id(v.block), (v.block, []))[1].append(i)
        elif type(v) is list:
            host[i] = v
        elif v is not None:
            vectors.append(i)
    if vectors:
        host.update(zip(vectors, to_host([pending[i][2] for i in vectors])))
    for block, idx in slab_rows.values():  # copy the used rows of each block, pick on the host
        where = [pending[i][2].index for i in idx]
        rows = block[: max(where) + 1].cpu()[where]
        host.update(zip(idx, _decode_slab_array(rows, [math.prod(pending[i][1]) for i in idx])))
    order = sorted(host)
    out: list[TensorStats | None] = [None] * len(pending)
    if order:
        array = np.array([host[i] for i in order], dtype=np.float64).reshape(len(order), _VECTOR_LEN)
        made = _stats_of([pending[i][0] for i in order], [tuple(pending[i][1]) for i in order], array)
        for i, stats in zip(order, made):
            out[i] = stats
    for i, (dtype, shape, v) in enumerate(pending):
        if out[i] is None:
            out[i] = TensorStats(dtype=_dtype_name(dtype), shape=tuple(shape), numel=math.prod(shape))
    return out


def summarize_now(x: Tensor) -> TensorStats:
    """Statistics of one tensor, read immediately (syncs; for one-off use and tests)."""
    vector = Summarizer()(x) if x.is_floating_point() else None
    return read([(x.dtype, tuple(x.shape), vector)])[0]
