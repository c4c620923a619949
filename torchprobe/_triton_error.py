"""The Triton kernel behind :func:`torchprobe.metrics.error_vector` on CUDA (imported only there).

One pass over a (reference, test) pair: both loaded once, widened to float64, and reduced to the
eight components of the error vector (layout in metrics.py): the largest |t - r| and the sums
|t - r|^2, |r|^2, <r, t>, |t|^2 over positions where both are finite, and the counts of non-finite
mismatches, of values non-finite in the test only, and of the same NaN/Inf on both sides. Each
program reduces its lanes and adds into one float64 row with atomics (the largest |t - r| through
the int64 view of the row: the bits of a non-negative float64 order like integers).
"""
import triton
import triton.language as tl


@triton.jit
def _wide(x):
    return x.to(tl.float32).to(tl.float64)


@triton.jit(do_not_specialize=["n", "iters", "row"])
def error_kernel(r_ptr, t_ptr, n, iters, out_f, out_i, row, BLOCK: tl.constexpr):
    """Program p handles tiles p, p + P, ... of BLOCK elements."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mx = tl.zeros([BLOCK], tl.float64)
    dd = tl.zeros([BLOCK], tl.float64)
    rr = tl.zeros([BLOCK], tl.float64)
    rt = tl.zeros([BLOCK], tl.float64)
    tt = tl.zeros([BLOCK], tl.float64)
    mismatch = tl.zeros([BLOCK], tl.int32)
    new = tl.zeros([BLOCK], tl.int32)
    same = tl.zeros([BLOCK], tl.int32)
    for i in range(0, iters):
        o = (pid + i * programs).to(tl.int64) * BLOCK + offs
        valid = o < n
        r = _wide(tl.load(r_ptr + o, mask=valid, other=0.0))  # masked lanes: 0 vs 0, counted nowhere
        t = _wide(tl.load(t_ptr + o, mask=valid, other=0.0))
        r_fin = tl.abs(r) < float("inf")  # False for NaN too
        t_fin = tl.abs(t) < float("inf")
        r_bad = (tl.abs(r) == float("inf")) | (r != r)
        t_bad = (tl.abs(t) == float("inf")) | (t != t)
        both = r_fin & t_fin
        r0 = tl.where(both, r, 0.0)
        t0 = tl.where(both, t, 0.0)
        d = t0 - r0
        mx = tl.maximum(mx, tl.abs(d))
        dd += d * d
        rr += r0 * r0
        rt += r0 * t0
        tt += t0 * t0
        neither = r_bad & t_bad
        alike = neither & (((r != r) & (t != t)) | (r == t))
        differ = neither & (r != t) & ((r == r) | (t == t))  # both non-finite, not the same NaN/Inf
        mismatch += ((r_fin & t_bad) | (r_bad & t_fin) | differ).to(tl.int32)
        new += (r_fin & t_bad).to(tl.int32)
        same += alike.to(tl.int32)
    base = row * 8
    tl.atomic_max(out_i + base, tl.max(mx, 0).to(tl.int64, bitcast=True))
    tl.atomic_add(out_f + base + 1, tl.sum(dd, 0))
    tl.atomic_add(out_f + base + 2, tl.sum(rr, 0))
    tl.atomic_add(out_f + base + 3, tl.sum(rt, 0))
    tl.atomic_add(out_f + base + 4, tl.sum(tt, 0))
    tl.atomic_add(out_f + base + 5, tl.sum(mismatch, 0).to(tl.float64))
    tl.atomic_add(out_f + base + 6, tl.sum(new, 0).to(tl.float64))
    tl.atomic_add(out_f + base + 7, tl.sum(same, 0).to(tl.float64))
