import math

import numpy as np
import pytest
import torch

from torchprobe.stats import Summarizer, read, summarize_now


def reference_stats(x: torch.Tensor) -> dict:
    """Independent float64 computation with numpy."""
    v = x.detach().to(torch.float64).numpy().ravel()
    finite = np.isfinite(v)
    f = np.where(finite, v, 0.0)
    a = np.abs(v)
    nz = (a > 0) & ~np.isnan(v)
    n_finite = finite.sum()
    return dict(
        min=f.min(), max=f.max(), absmax=np.abs(f).max(), mean=f.sum() / n_finite, rms=math.sqrt((f * f).sum() / n_finite),
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_field_matches_float64_reference(dtype):
    x = special_tensor(dtype).reshape(64, 64)
    s = summarize_now(x)
    ref = reference_stats(x)
    assert s.shape == (64, 64) and s.numel == 4096 and s.dtype == str(dtype).replace("torch.", "")
    for field in ("min", "max", "absmax", "mean", "rms"):
        assert getattr(s, field) == pytest.approx(ref[field], rel=1e-5), field
    for field in ("nan", "inf", "beyond_fp16", "subnormal_fp16", "flush_fp16"):
        assert getattr(s, field) == ref[field], field
    if dtype in (torch.float32, torch.float64):
        assert s.subnormal_bf16 == ref["subnormal_bf16"] and s.flush_bf16 == ref["flush_bf16"]
        assert s.beyond_fp16 > 0 and s.flush_fp16 > 0
    else:
        assert s.subnormal_bf16 is None and s.flush_bf16 is None
    assert s.headroom_bits == pytest.approx(math.log2(65504 / ref["absmax"]))


def test_integer_and_empty_tensors_get_no_float_stats():
    s = summarize_now(torch.arange(10))
    assert s.numel == 10 and s.absmax is None and not s.is_floating
    e = summarize_now(torch.empty(0, 3))
    assert e.numel == 0 and e.absmax is None


def test_summaries_stay_on_device_until_read():
    summarize = Summarizer()
    xs = [torch.randn(100) * i for i in range(1, 5)]
    vectors = [summarize(x) for x in xs]
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in vectors)
    stats = read([(x.dtype, tuple(x.shape), v) for x, v in zip(xs, vectors)])
    assert [s.absmax for s in stats] == pytest.approx([float(x.abs().max()) for x in xs])


def test_all_nonfinite_tensor():
    s = summarize_now(torch.tensor([math.nan, math.inf]))
    assert s.nan == 1 and s.inf == 1 and math.isnan(s.mean)
