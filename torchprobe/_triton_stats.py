"""The Triton kernel behind :class:`torchprobe.stats.Summarizer` on CUDA (imported only there).

One pass over a tensor: min/max/sum/sum of squares of its finite values and counts of |x| at or
above each bucket edge, accumulated per lane, reduced per program and added with atomics into one
row of an int64 *slab* (layout in stats.py). |x| is classified by integer comparison of its fp32
bits, which no flush-to-zero mode can change (fp16 widens exactly; bf16 is widened by shifting its
bits). Each loop step issues four 16-byte loads per thread before using them, so enough bytes are
in flight to approach the read rate.

The kernel is bound by its per-element integer work, not by memory, so it does per element only
what the values in front of it need:

- per format (``FMT``): every non-zero fp16 is at least 2**-24 and every finite fp16 at most
  65504; every non-zero bf16 is at least 2**-133. The edges a format cannot separate are not
  compared.
- per loop step (4 x BLOCK elements), from the largest and the smallest non-zero magnitude of the
  step (two block reductions): the finiteness masks and the counts above 65504, Inf and NaN run
  only in a step that holds such a value (``HIGH``), the counts below 2**-24 only in a step that
  holds a non-zero value that small (``LOW``). Real activations have neither in almost every step.
  The counts are kept as "above the edge" for the common edges (non-zero, 2**-14) and as "between
  0 and the edge" / "above the edge" for the rare ones, and combined per program at the end.
"""
import triton
import triton.language as tl

_T_BEYOND = tl.constexpr(0x477FE001)  # fp32 bits just above 65504
_T_INF = tl.constexpr(0x7F800000)
_T_TINY = tl.constexpr(0x33800000)  # 2**-24


@triton.jit
def _widen(raw):
    if raw.dtype == tl.bfloat16:
        x = (raw.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)
    return x, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _key(v):
    """Order-preserving int64 of an fp32 value (for integer atomic min/max)."""
    b = v.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _accumulate(x, m, valid, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan,
                MASKED: tl.constexpr, HIGH: tl.constexpr, LOW: tl.constexpr, FMT: tl.constexpr):
    """Fold one vector into the accumulators. ``m`` = |x| as fp32 bits; masked-off lanes load 0.
    min/max are over finite values only; the sums count non-finite values as 0.
    ``HIGH``: the vector may hold values above 65504 or non-finite ones; ``LOW``: it may hold
    non-zero values below 2**-24. Without them those counts and masks are skipped."""
    if HIGH:
        fin = m < _T_INF
        if MASKED:
            keep = valid & fin
        else:
            keep = fin
        lo = tl.minimum(lo, tl.where(keep, x, float("inf")))
        hi = tl.maximum(hi, tl.where(keep, x, float("-inf")))
        xf = tl.where(fin, x, 0.0)
        if FMT != 1:  # fp16 has no finite value above 65504
            a65 += (m >= _T_BEYOND).to(tl.int32)
        ainf += (m >= _T_INF).to(tl.int32)
        anan += (m > _T_INF).to(tl.int32)
    else:
        if MASKED:
            lo = tl.minimum(lo, tl.where(valid, x, float("inf")))
            hi = tl.maximum(hi, tl.where(valid, x, float("-inf")))
        else:
            lo = tl.minimum(lo, x)
            hi = tl.maximum(hi, x)
        xf = x
    s += xf
    q += xf * xf
    nz += (m >= 1).to(tl.int32)
    n14 += (m >= 0x38800000).to(tl.int32)  # 2**-14
    if LOW:
        if FMT != 1:  # every non-zero fp16 is at least 2**-24
            # counted below each edge, zeros (and masked lanes) included: taken out at the end
            zl += (m == 0).to(tl.int32)
            b24 += (m < _T_TINY).to(tl.int32)
            b126 += (m < 0x00800000).to(tl.int32)  # 2**-126
            if FMT == 0:  # every non-zero bf16 is at least 2**-133
                b133 += (m < 0x00010000).to(tl.int32)
    return lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan


@triton.jit(do_not_specialize=["full_steps", "iters", "row"])
def summary_kernel(x_ptr, n, full_steps, iters, slab_i, slab_f, row, BLOCK: tl.constexpr, FMT: tl.constexpr):
    """Program p handles steps p, p + P, ... of 4 * BLOCK elements; ``full_steps`` of them lie
    wholly inside the tensor (no lane mask), the one after that is partial. ``FMT``: 0 fp32,
    1 fp16, 2 bf16 (which edges exist, see the module docstring)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    q = tl.zeros([BLOCK], tl.float32)
    nz = tl.zeros([BLOCK], tl.int32)
    n14 = tl.zeros([BLOCK], tl.int32)
    zl = tl.zeros([BLOCK], tl.int32)
    b133 = tl.zeros([BLOCK], tl.int32)
    b126 = tl.zeros([BLOCK], tl.int32)
    b24 = tl.zeros([BLOCK], tl.int32)
    a65 = tl.zeros([BLOCK], tl.int32)
    ainf = tl.zeros([BLOCK], tl.int32)
    anan = tl.zeros([BLOCK], tl.int32)
    for i in range(0, iters):
        step = pid + i * programs
        base = step * (4 * BLOCK)
        if step < full_steps:
            x0, m0 = _widen(tl.load(x_ptr + base + offs))
            x1, m1 = _widen(tl.load(x_ptr + base + BLOCK + offs))
            x2, m2 = _widen(tl.load(x_ptr + base + 2 * BLOCK + offs))
            x3, m3 = _widen(tl.load(x_ptr + base + 3 * BLOCK + offs))
            top = tl.max(tl.maximum(tl.maximum(m0, m1), tl.maximum(m2, m3)), 0)
            if FMT == 1:
                rare = top >= _T_INF  # in fp16 "above 65504" is Inf
                low = top < 0  # every non-zero fp16 is at least 2**-24
            else:
                rare = top >= _T_BEYOND
                big = 0x7FFFFFFF  # the smallest non-zero magnitude of the step
                u0 = tl.minimum(tl.where(m0 == 0, big, m0), tl.where(m1 == 0, big, m1))
                u1 = tl.minimum(tl.where(m2 == 0, big, m2), tl.where(m3 == 0, big, m3))
                low = tl.min(tl.minimum(u0, u1), 0) < _T_TINY
            if rare:  # every mask and count
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x0, m0, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, True, True, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x1, m1, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, True, True, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x2, m2, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, True, True, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x3, m3, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, True, True, FMT)
            elif low:  # values below 2**-24, none above 65504
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x0, m0, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, False, True, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x1, m1, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, False, True, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x2, m2, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, False, True, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x3, m3, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, False, True, FMT)
            else:  # the common step: finite, within FP16's range, nothing below 2**-24 but zeros
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x0, m0, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, False, False, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x1, m1, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, False, False, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x2, m2, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, False, False, FMT)
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x3, m3, True, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, False, False, False, FMT)
        elif base < n:  # the partial step: lane masks, every count
            for u in tl.static_range(4):
                o = base + u * BLOCK + offs
                valid = o < n
                x, m = _widen(tl.load(x_ptr + o, mask=valid, other=0.0))  # masked lanes: m == 0, uncounted
                lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan = _accumulate(x, m, valid, lo, hi, s, q, nz, n14, zl, b133, b126, b24, a65, ainf, anan, True, True, True, FMT)
    r = row * 16
    tl.atomic_min(slab_i + r, _key(tl.min(lo, 0)))
    tl.atomic_max(slab_i + r + 1, _key(tl.max(hi, 0)))
    tl.atomic_add(slab_f + r + 2, tl.sum(s, 0).to(tl.float64))
    tl.atomic_add(slab_f + r + 3, tl.sum(q, 0).to(tl.float64))
    c0 = tl.sum(nz.to(tl.int64), 0)
    zeros = tl.sum(zl.to(tl.int64), 0)  # over the steps that counted below the small edges
    tl.atomic_add(slab_i + r + 4, c0)
    if FMT == 0:
        tl.atomic_add(slab_i + r + 5, c0 - (tl.sum(b133.to(tl.int64), 0) - zeros))
    else:  # fp16, bf16: nothing non-zero below 2**-133
        tl.atomic_add(slab_i + r + 5, c0)
    tl.atomic_add(slab_i + r + 6, c0 - (tl.sum(b126.to(tl.int64), 0) - zeros))
    tl.atomic_add(slab_i + r + 7, c0 - (tl.sum(b24.to(tl.int64), 0) - zeros))
    tl.atomic_add(slab_i + r + 8, tl.sum(n14.to(tl.int64), 0))
    c6 = tl.sum(ainf.to(tl.int64), 0)
    if FMT == 1:
        tl.atomic_add(slab_i + r + 9, c6)  # above 65504 = Inf or NaN in fp16
    else:
        tl.atomic_add(slab_i + r + 9, tl.sum(a65.to(tl.int64), 0))
    tl.atomic_add(slab_i + r + 10, c6)
    tl.atomic_add(slab_i + r + 11, tl.sum(anan.to(tl.int64), 0))
