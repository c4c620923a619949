"""The Triton kernel behind :class:`torchprobe.stats.Summarizer` on CUDA (imported only there).

One pass over a tensor: min/max/sum/sum of squares of its finite values and counts of |x| at or
above each bucket edge, accumulated per lane, reduced per program and added with atomics into one
row of an int64 *slab* (layout in stats.py). |x| is classified by integer comparison of its fp32
bits, which no flush-to-zero mode can change (fp16 widens exactly; bf16 is widened by shifting its
bits). Each loop step issues four 16-byte loads per thread before using them, so enough bytes are
in flight to approach the copy rate.

The kernel is bound by its per-element integer work, not by memory, so it counts only the edges
the input format can separate (``FMT``): every non-zero fp16 is at least 2**-24 and every finite
fp16 at most 65504, so fp16 needs 4 of the 8 comparisons; every non-zero bf16 is at least 2**-133,
so bf16 needs 7. The counts it skips equal ones it makes, and are written from those. (H200, one
large tensor: 2.49 TB/s fp32, 1.96 fp16, 1.50 bf16 against a 4.2 TB/s read. A variant that skipped
the finiteness masks and the rare counts per loop step, decided by two block reductions, ran 15 %
slower: holding four loads for the decision doubled the registers to 139 and halved occupancy.)
"""
import triton
import triton.language as tl


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
def _accumulate(x, m, valid, lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7, MASKED: tl.constexpr, FMT: tl.constexpr):
    """Fold one vector into the accumulators. ``m`` = |x| as fp32 bits; masked-off lanes load 0.
    min/max are over finite values only (NaN and +-Inf never enter them); the sums count
    non-finite values as 0."""
    fin = m < 0x7F800000
    if MASKED:
        keep = valid & fin
    else:
        keep = fin
    lo = tl.minimum(lo, tl.where(keep, x, float("inf")))
    hi = tl.maximum(hi, tl.where(keep, x, float("-inf")))
    xf = tl.where(fin, x, 0.0)
    s += xf
    q += xf * xf
    c0 += (m >= 0x00000001).to(tl.int32)  # non-zero
    if FMT == 0:  # fp32 only: 2**-133 (every non-zero bf16 is at least that)
        c1 += (m >= 0x00010000).to(tl.int32)
    if FMT != 1:  # fp32, bf16: 2**-126, 2**-24, above 65504 (fp16 has nothing to separate there)
        c2 += (m >= 0x00800000).to(tl.int32)
        c3 += (m >= 0x33800000).to(tl.int32)
        c5 += (m >= 0x477FE001).to(tl.int32)
    c4 += (m >= 0x38800000).to(tl.int32)  # 2**-14
    c6 += (m >= 0x7F800000).to(tl.int32)  # Inf or NaN
    c7 += (m >= 0x7F800001).to(tl.int32)  # NaN
    return lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit(do_not_specialize=["full_steps", "iters", "row"])
def summary_kernel(x_ptr, n, full_steps, iters, slab_i, slab_f, row, BLOCK: tl.constexpr, FMT: tl.constexpr):
    """Program p handles steps p, p + P, ... of 4 * BLOCK elements; ``full_steps`` of them lie
    wholly inside the tensor (no lane mask), the one after that is partial. ``FMT``: 0 fp32,
    1 fp16, 2 bf16 (which edge counts are made, see the module docstring)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    q = tl.zeros([BLOCK], tl.float32)
    c0 = tl.zeros([BLOCK], tl.int32)
    c1 = tl.zeros([BLOCK], tl.int32)
    c2 = tl.zeros([BLOCK], tl.int32)
    c3 = tl.zeros([BLOCK], tl.int32)
    c4 = tl.zeros([BLOCK], tl.int32)
    c5 = tl.zeros([BLOCK], tl.int32)
    c6 = tl.zeros([BLOCK], tl.int32)
    c7 = tl.zeros([BLOCK], tl.int32)
    for i in range(0, iters):
        step = pid + i * programs
        base = step * (4 * BLOCK)
        if step < full_steps:
            r0 = tl.load(x_ptr + base + offs)
            r1 = tl.load(x_ptr + base + BLOCK + offs)
            r2 = tl.load(x_ptr + base + 2 * BLOCK + offs)
            r3 = tl.load(x_ptr + base + 3 * BLOCK + offs)
            x, m = _widen(r0)
            lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7 = _accumulate(x, m, m == m, lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7, False, FMT)
            x, m = _widen(r1)
            lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7 = _accumulate(x, m, m == m, lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7, False, FMT)
            x, m = _widen(r2)
            lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7 = _accumulate(x, m, m == m, lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7, False, FMT)
            x, m = _widen(r3)
            lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7 = _accumulate(x, m, m == m, lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7, False, FMT)
        elif base < n:
            for u in tl.static_range(4):
                o = base + u * BLOCK + offs
                valid = o < n
                x, m = _widen(tl.load(x_ptr + o, mask=valid, other=0.0))  # masked lanes: m == 0, uncounted
                lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7 = _accumulate(x, m, valid, lo, hi, s, q, c0, c1, c2, c3, c4, c5, c6, c7, True, FMT)
    r = row * 16
    tl.atomic_min(slab_i + r, _key(tl.min(lo, 0)))
    tl.atomic_max(slab_i + r + 1, _key(tl.max(hi, 0)))
    tl.atomic_add(slab_f + r + 2, tl.sum(s, 0).to(tl.float64))
    tl.atomic_add(slab_f + r + 3, tl.sum(q, 0).to(tl.float64))
    n0 = tl.sum(c0.to(tl.int64), 0)
    n4 = tl.sum(c4.to(tl.int64), 0)
    n6 = tl.sum(c6.to(tl.int64), 0)
    if FMT == 0:
        n1 = tl.sum(c1.to(tl.int64), 0)
    else:
        n1 = n0
    if FMT == 1:
        n2 = n0
        n3 = n0
        n5 = n6
    else:
        n2 = tl.sum(c2.to(tl.int64), 0)
        n3 = tl.sum(c3.to(tl.int64), 0)
        n5 = tl.sum(c5.to(tl.int64), 0)
    tl.atomic_add(slab_i + r + 4, n0)
    tl.atomic_add(slab_i + r + 5, n1)
    tl.atomic_add(slab_i + r + 6, n2)
    tl.atomic_add(slab_i + r + 7, n3)
    tl.atomic_add(slab_i + r + 8, n4)
    tl.atomic_add(slab_i + r + 9, n5)
    tl.atomic_add(slab_i + r + 10, n6)
    tl.atomic_add(slab_i + r + 11, tl.sum(c7.to(tl.int64), 0))
