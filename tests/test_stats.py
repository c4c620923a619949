import dataclasses
import doctest
import math

import numpy as np
import pytest
import torch

from torchprobe import formats
from torchprobe.errors import InvalidArgument
from torchprobe.formats import headroom_bits
from torchprobe.stats import _SLAB_WIDTH, Summarizer, _decode_slab_rows, _from_vector, read, summarize_now

FLOAT_FIELDS = ("min", "max", "absmax", "mean", "rms", "headroom_bits")
COUNT_FIELDS = ("nan", "inf", "beyond_fp16", "subnormal_fp16", "flush_fp16")


def reference_stats(x: torch.Tensor) -> dict:
    """Independent float64 computation with NumPy: float statistics over the finite values only,
    NaN (undefined) when there is none."""
    v = x.detach().to(torch.float64).numpy().ravel()
    finite = np.isfinite(v)
    f = v[finite]
    a = np.abs(v)
    nz = (a > 0) & ~np.isnan(v)
    if f.size:
        absmax = float(np.abs(f).max())
        floats = dict(min=float(f.min()), max=float(f.max()), absmax=absmax, mean=float(f.mean()),
                      rms=math.sqrt(float((f * f).mean())),
                      headroom_bits=math.inf if absmax == 0 else math.log2(65504 / absmax))
    else:
        floats = dict.fromkeys(FLOAT_FIELDS, math.nan)
    return dict(
        **floats,
        nan=int(np.isnan(v).sum()), inf=int(np.isinf(v).sum()), beyond_fp16=int((finite & (a > 65504)).sum()),
        subnormal_fp16=int((nz & (a < 2**-14)).sum()), flush_fp16=int((nz & (a < 2**-24)).sum()),
        subnormal_bf16=int((nz & (a < 2**-126)).sum()), flush_bf16=int((nz & (a < 2**-133)).sum()),
    )


def special_tensor(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g, dtype=torch.float64) * 10
    x[:40] = torch.logspace(-45, -3, 40, dtype=torch.float64)  # tiny values across the subnormal ranges
    x[40:50] = torch.linspace(6e4, 9e4, 10, dtype=torch.float64)  # around the FP16 max
    x[50], x[51], x[52], x[53] = math.nan, math.inf, -math.inf, 0.0
    x[54] = -70000.0
    return x.to(dtype)


def _relu_like(g: torch.Generator) -> torch.Tensor:
    x = torch.relu(torch.randn(150_001, generator=g, dtype=torch.float64))
    x[1000:1040] = torch.logspace(-45, -3, 40, dtype=torch.float64)
    x[70_000:70_005] = torch.tensor([7e4, 1e5, 65504.0, 65505.0, 2e5], dtype=torch.float64)
    x[140_000], x[140_001] = math.nan, math.inf
    return x


def _spread(g: torch.Generator) -> torch.Tensor:
    x = torch.randn(200_003, generator=g, dtype=torch.float64) * 3
    x[5], x[66_000], x[131_100] = 1e-7, -3e-6, 0.0
    x[199_999] = -8e4
    return x


def case(name: str, dtype: torch.dtype) -> torch.Tensor:
    nan, inf = math.nan, math.inf
    g = torch.Generator().manual_seed(2)
    values = {
        "special": lambda: special_tensor(torch.float64),
        "all-nan": lambda: torch.full((37,), nan, dtype=torch.float64),
        "all-inf": lambda: torch.tensor([inf, -inf, inf] * 7, dtype=torch.float64),
        "nan-and-inf": lambda: torch.tensor([nan, inf, -inf, nan], dtype=torch.float64),
        # finite values all of one sign, no zero, beside NaN/Inf: min/max must not become 0
        "positive-with-nan": lambda: torch.cat([torch.rand(50, generator=g, dtype=torch.float64) + 0.5,
                                               torch.tensor([nan, inf], dtype=torch.float64)]),
        "negative-with-inf": lambda: torch.cat([-torch.rand(50, generator=g, dtype=torch.float64) - 3.0,
                                               torch.tensor([-inf, nan], dtype=torch.float64)]),
        "one-finite": lambda: torch.tensor([nan, -2.5, inf], dtype=torch.float64),
        "zeros-and-nan": lambda: torch.tensor([0.0, -0.0, nan], dtype=torch.float64),
        # large enough for the host path's torch sums (above its NumPy float64 cut-off)
        "large-with-nan": lambda: torch.cat([torch.rand(20000, generator=g, dtype=torch.float64) + 1.0,
                                            torch.full((5,), nan, dtype=torch.float64)]),
        # several chunks of the host counting walk: mostly zeros (a ReLU output) with tiny values
        # in every sub-range, values beyond FP16 and a NaN/Inf in different chunks
        "relu-like": lambda: _relu_like(g),
        # several chunks, few values near zero: the gathering branch of the walk
        "spread": lambda: _spread(g),
    }[name]()
    return values.to(dtype)


CASES = ["special", "all-nan", "all-inf", "nan-and-inf", "positive-with-nan", "negative-with-inf", "one-finite",
         "zeros-and-nan", "large-with-nan", "relu-like", "spread"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def assert_matches(s, x: torch.Tensor) -> None:
    ref = reference_stats(x)
    assert s.numel == x.numel() and s.dtype == str(x.dtype).replace("torch.", "") and s.is_floating
    for field in FLOAT_FIELDS:
        got, want = getattr(s, field), ref[field]
        if math.isnan(want):
            assert math.isnan(got), (field, got)
        else:
            assert got == pytest.approx(want, rel=1e-5), field
    for field in COUNT_FIELDS:
        assert getattr(s, field) == ref[field], field
    if x.dtype in (torch.float32, torch.float64):
        assert (s.subnormal_bf16, s.flush_bf16) == (ref["subnormal_bf16"], ref["flush_bf16"])
    else:
        assert s.subnormal_bf16 is None and s.flush_bf16 is None


# -- the slab rows of the Triton kernel, built by hand from the layout documented in stats.py --------

_EDGE_BITS = np.array([0x00000001, 0x00010000, 0x00800000, 0x33800000, 0x38800000, 0x477FE001, 0x7F800000, 0x7F800001],
                      dtype=np.int64)


def _key(v: np.float32) -> int:
    """Order-preserving int of an fp32 value: the bits, with the magnitude bits flipped if negative."""
    b = int(np.array(v, dtype=np.float32).view(np.int32))
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def slab_row(x: torch.Tensor) -> np.ndarray:
    """One int64[16] row as the kernel leaves it for ``x`` (fp16/bf16/fp32; they widen to fp32 exactly)."""
    v = x.float().numpy().ravel()
    m = v.view(np.int32).astype(np.int64) & 0x7FFFFFFF
    f = v[np.isfinite(v)]
    row = np.zeros(_SLAB_WIDTH, dtype=np.int64)
    row[0] = _key(f.min() if f.size else np.float32(np.inf))
    row[1] = _key(f.max() if f.size else np.float32(-np.inf))
    f64 = f.astype(np.float64)
    row[2:4] = np.array([f64.sum(), (f64 * f64).sum()], dtype=np.float64).view(np.int64)
    row[4:12] = [(m >= e).sum() for e in _EDGE_BITS]
    return row


def test_order_preserving_keys_of_the_layout():
    values = np.array([-np.inf, -65504.0, -1.5, -2.0**-149, -0.0, 0.0, 2.0**-149, 1.5, 3.4e38, np.inf], dtype=np.float32)
    keys = [_key(v) for v in values]
    assert keys == sorted(keys) and len(set(keys[4:6])) == 2  # -0.0 just below +0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_slab_rows_decode_to_the_float64_reference(dtype):
    xs = [case(name, dtype) for name in CASES]
    rows = torch.from_numpy(np.stack([slab_row(x) for x in xs]))
    vectors = _decode_slab_rows(rows, [x.numel() for x in xs])
    for name, x, v in zip(CASES, xs, vectors):
        s = _from_vector(x.dtype, tuple(x.shape), v)
        try:
            assert_matches(s, x)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def test_read_decodes_slab_rows_in_one_batch_as_row_by_row():
    """read() turns slab rows (here hand-built, in a host block) into the same statistics as the
    row-by-row decoding, and both match the float64 reference; mixed with host vectors and None."""
    from torchprobe.stats import SlabRow

    xs = [case(name, dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16) for name in CASES]
    block = torch.from_numpy(np.stack([slab_row(x) for x in xs]))
    pending = [(x.dtype, tuple(x.shape), SlabRow(block, i)) for i, x in enumerate(xs)]
    pending.insert(3, (torch.int64, (5,), None))
    pending.insert(7, (xs[0].dtype, tuple(xs[0].shape), Summarizer()(xs[0])))
    stats = read(pending)
    singles = [_from_vector(x.dtype, tuple(x.shape), v) for x, v in zip(xs, _decode_slab_rows(block, [x.numel() for x in xs]))]
    assert stats[3].numel == 5 and not stats[3].is_floating
    assert_matches(stats[7], xs[0])
    batch = [s for i, s in enumerate(stats) if i not in (3, 7)]
    for x, got, one in zip(xs, batch, singles):
        assert_matches(got, x)
        for field in dataclasses.fields(one):
            a, b = getattr(got, field.name), getattr(one, field.name)
            assert a == b or (a != a and b != b), (field.name, a, b)


def test_a_row_with_no_finite_value_is_undefined_whatever_its_keys():
    x = torch.full((8,), math.nan)
    row = slab_row(x)
    row[0] = row[1] = _key(np.float32(0.0))  # a kernel that counted non-finite values as 0
    [v] = _decode_slab_rows(torch.from_numpy(row[None]), [8])
    s = _from_vector(x.dtype, (8,), v)
    assert all(math.isnan(getattr(s, f)) for f in FLOAT_FIELDS) and s.nan == 8


# -- the eager paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [None, False], ids=["host", "branch-free"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_path_matches_the_float64_reference(fused, dtype):
    summarize = Summarizer(fused)
    for name in CASES:
        x = case(name, dtype)
        s = read([(x.dtype, tuple(x.shape), summarize(x))])[0]
        try:
            assert_matches(s, x)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_field_matches_float64_reference(dtype):
    x = special_tensor(dtype).reshape(64, 64)
    s = summarize_now(x)
    assert s.shape == (64, 64)
    assert_matches(s, x)
    if dtype in (torch.float32, torch.float64):
        assert s.beyond_fp16 > 0 and s.flush_fp16 > 0


def test_integer_and_empty_tensors_get_no_float_stats():
    s = summarize_now(torch.arange(10))
    assert s.numel == 10 and s.absmax is None and not s.is_floating
    for dtype in DTYPES:
        e = summarize_now(torch.empty(0, 3, dtype=dtype))
        assert e.numel == 0 and e.shape == (0, 3) and not e.is_floating
        assert all(getattr(e, f) is None for f in (*FLOAT_FIELDS, *COUNT_FIELDS))


def test_summaries_are_read_later_in_one_step():
    xs = [torch.randn(100) * i for i in range(1, 5)]
    host = [Summarizer()(x) for x in xs]  # the CPU path reads as it goes: host lists
    eager = [Summarizer(fused=False)(x) for x in xs]  # the branch-free path stays on the device
    assert all(type(v) is list and len(v) == 13 for v in host)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in eager)
    for vectors in (host, eager, [v for pair in zip(host, eager) for v in pair][::2]):
        stats = read([(x.dtype, tuple(x.shape), v) for x, v in zip(xs, vectors)])
        assert [s.absmax for s in stats] == pytest.approx([float(x.abs().max()) for x in xs])


@pytest.mark.parametrize("fused", [None, False], ids=["host", "branch-free"])
def test_strided_tensors_are_read_where_they_lie(fused):
    """Dense non-contiguous tensors (channels-last, permuted) are read in place, others copied;
    the statistics are those of the same values contiguous."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, 10, 12, generator=g) * 100
    base[0, 0, 0, :3] = torch.tensor([math.nan, 1e-30, 7e4])
    views = {
        "channels-last": base.contiguous(memory_format=torch.channels_last),
        "permuted": base.permute(2, 0, 3, 1),
        "transposed": base.transpose(1, 3),
        "strided slice": base[:, ::2],
        "expanded": base[:1, :1].expand(3, 2, 10, 12),
        "offset": base.reshape(-1)[7:7 + 2000],
    }
    summarize = Summarizer(fused)
    for name, v in views.items():
        s = read([(v.dtype, tuple(v.shape), summarize(v))])[0]
        try:
            assert_matches(s, v.contiguous())
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def test_all_nonfinite_tensor_has_undefined_statistics_not_zero_absmax_and_infinite_headroom():
    s = summarize_now(torch.tensor([math.nan, math.inf]))
    assert s.nan == 1 and s.inf == 1 and s.is_floating
    assert all(math.isnan(getattr(s, f)) for f in FLOAT_FIELDS)
    zeros = summarize_now(torch.zeros(4))  # an all-zero tensor is defined: absmax 0, headroom inf
    assert zeros.absmax == 0 and zeros.headroom_bits == math.inf


def test_headroom_bits():
    assert headroom_bits(65504.0) == 0 and headroom_bits(256.0) == pytest.approx(math.log2(65504 / 256))
    assert headroom_bits(1e6) < 0 and headroom_bits(math.inf) == -math.inf and headroom_bits(0.0) == math.inf
    assert math.isnan(headroom_bits(math.nan))
    with pytest.raises(InvalidArgument, match="absolute value >= 0"):
        headroom_bits(-1.0)
    assert doctest.testmod(formats).failed == 0


def test_host_counts_split_over_threads_add_up(monkeypatch):
    """A large CPU tensor is counted in pieces on several threads; the pieces add up to the
    float64 reference (forced here on small cases, any thread count)."""
    from torchprobe import stats as S

    monkeypatch.setattr(S, "_pieces", lambda n: 3 if n >= 64 else 1)
    for dtype in (torch.float32, torch.float64):
        for name in CASES:
            x = case(name, dtype)
            try:
                assert_matches(read([(x.dtype, tuple(x.shape), Summarizer()(x))])[0], x)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from e


def test_torch_counting_path_matches_the_float64_reference(monkeypatch):
    """The torch-ops counting (used with several threads on large tensors when enabled)."""
    from torchprobe import stats as S

    monkeypatch.setattr(S, "_TORCH_COUNTS_MIN", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for dtype in (torch.float32, torch.float64):
        for name in CASES:
            x = case(name, dtype)
            try:
                assert_matches(read([(x.dtype, tuple(x.shape), Summarizer()(x))])[0], x)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from e
