"""CUDA behaviour: fused on-device statistics, no per-module sync, the story on a GPU."""
import math

import pytest
import torch
from torch import nn

import torchprobe as tp
from torchprobe import stats as S
from torchprobe.models.detector import build_detector
from torchprobe.stats import Summarizer, read
from conftest import assert_unchanged, snapshot
from test_stats import CASES, assert_matches, case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fused_statistics_match_eager_on_cuda():
    x = torch.randn(1 << 20, device="cuda") * 1000
    x[:10] = float("nan")
    x[10:20] = float("inf")
    x[20:30] = 1e-30
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = x.to(dtype)
        eager, fused = read([(t.dtype, tuple(t.shape), Summarizer(fused=f)(t)) for f in (False, True)])
        for field in ("nan", "inf", "beyond_fp16", "subnormal_fp16", "flush_fp16", "subnormal_bf16", "flush_bf16", "numel"):
            assert getattr(eager, field) == getattr(fused, field), (dtype, field)
        for field in ("min", "max", "absmax", "mean", "rms"):
            assert getattr(fused, field) == pytest.approx(getattr(eager, field), rel=1e-4), (dtype, field)


def test_record_never_syncs_per_module_under_autocast():
    model, images = build_detector(batch=8)
    model, images = model.cuda(), images.cuda()
    with torch.no_grad(), tp.record(model) as rec, torch.autocast("cuda", dtype=torch.float16):
        model(images)  # warm-up: compiles the fused reduction
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), tp.record(model) as rec, torch.autocast("cuda", dtype=torch.float16):
            model(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = rec.rows  # the one sync
    assert rows[-1].key.startswith("(root)")
    assert rec["encoder.layers.0.ffn.0"].dtype == "float16"  # autocast ran the Linear in FP16
    assert rec["encoder.layers.0.norm1"].dtype == "float32"  # and layer_norm in FP32


def test_story_on_the_gpu():
    model, images = build_detector()
    model, images = model.cuda(), images.cuda()
    before = snapshot(model)
    rep = tp.report(model, images, targets=("autocast:fp16", "eager:fp16", "strict-onnx:fp16"))
    assert_unchanged(model, before)
    assert rep.outcome("autocast:fp16").passed and rep.outcome("eager:fp16").passed
    assert not rep.outcome("strict-onnx:fp16").passed
    assert (rep.culprits[0].module, rep.culprits[0].reason) == ("encoder.layers.1.norm2", "overflow")
    norm = rep.error("encoder.layers.1.norm2", "autocast:fp16", "local")
    assert norm.metrics.rel_l2 == 0.0  # CUDA autocast keeps layer_norm in FP32
    fix = tp.bisect(model, images, target="strict-onnx:fp16")
    assert fix and fix.keep_fp32 == ("encoder.layers.1.norm2",)
    assert_unchanged(model, before)


def test_capture_offload_keeps_activations_off_the_gpu():
    model, images = build_detector(batch=8)
    model, images = model.cuda(), images.cuda()
    with torch.no_grad(), tp.record(model, capture=True, offload=True) as rec:
        model(images)
    assert all(t.device.type == "cpu" for t in rec.tensors.values())
    assert torch.allclose(rec.tensors["backbone"], model.backbone(images).cpu())


def _fused_stats(x: torch.Tensor, summarize: Summarizer | None = None):
    summarize = summarize or Summarizer(fused=True)
    return read([(x.dtype, tuple(x.shape), summarize(x))])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_the_float64_reference_on_every_case(dtype):
    """Every case of the host tests, through the Triton kernel: the first launch of each
    specialization goes through Triton's JIT, later ones through the direct launcher; both are
    checked against the NumPy float64 reference."""
    summarize = Summarizer(fused=True)
    for name in CASES:
        x = case(name, dtype).cuda()
        for attempt in ("jit", "direct"):
            s = _fused_stats(x, summarize)
            assert isinstance(summarize(x), S.SlabRow)
            try:
                assert_matches(s, x.cpu())
            except AssertionError as e:
                raise AssertionError(f"{name} ({attempt}): {e}") from e


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_min_and_max_are_over_finite_values_only(dtype):
    """All positive plus NaN/Inf: min must stay positive (a kernel that counted NaN as 0 gave min
    0); all NaN: no finite value, every float statistic undefined."""
    g = torch.Generator().manual_seed(5)
    positive = torch.rand(100_003, generator=g) + 0.25
    positive[::1000] = math.nan
    positive[7] = math.inf
    negative = -positive
    negative[9] = -math.inf
    for sign, x in ((1, positive), (-1, negative)):
        x = x.to(dtype).cuda()
        s = _fused_stats(x)
        finite = x[torch.isfinite(x)].float()
        assert s.min == pytest.approx(float(finite.min()), rel=1e-6) and s.max == pytest.approx(float(finite.max()), rel=1e-6)
        assert (s.min > 0) if sign > 0 else (s.max < 0)  # a kernel counting NaN as 0 gave 0 here
        assert s.nan == 101 and s.inf == (1 if sign > 0 else 2)  # negative also holds -inf from positive[7]
    for n in (1, 37, 100_000):
        s = _fused_stats(torch.full((n,), math.nan, dtype=dtype, device="cuda"))
        assert s.nan == n and s.inf == 0 and s.numel == n
        assert all(math.isnan(getattr(s, f)) for f in ("min", "max", "absmax", "mean", "rms", "headroom_bits"))


def test_kernel_reads_strided_misaligned_and_large_tensors():
    g = torch.Generator().manual_seed(6)
    # offsets keep the means away from 0, where a relative check of an FP32 sum means nothing
    base = (torch.randn(8, 16, 33, 35, generator=g) * 50 + 100).cuda()
    base[0, 0, 0, :4] = torch.tensor([math.nan, 1e-30, 7e4, -math.inf])
    big = (torch.randn(3 * 2**22 + 5, generator=g) + 3).cuda()  # many programs, a partial last step
    big[123_456] = 1e-6
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        b = base.to(dtype)
        views = {
            "channels-last": b.contiguous(memory_format=torch.channels_last),  # dense: read in place
            "permuted": b.permute(0, 2, 3, 1),
            "strided slice": b[:, ::3],  # not dense: copied first
            "misaligned": b.reshape(-1)[3:3 + 70_001],
            "big": big.to(dtype),
        }
        for name, v in views.items():
            try:
                for _ in range(2):  # JIT, then the direct launcher
                    assert_matches(_fused_stats(v), v.cpu().contiguous())
            except AssertionError as e:
                raise AssertionError(f"{name} {dtype}: {e}") from e


def test_record_on_a_side_stream_and_after_inplace_ops():
    """The kernel runs on the caller's current stream, so it reads each output before the
    in-place op that follows it; a tensor returned again unchanged (Identity) is read once."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Identity(), nn.Linear(64, 8)).cuda()
    x = torch.randn(512, 64, device="cuda")
    expected = model[0](x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):  # the first record compiles; the later ones use the direct launcher
            with tp.record(model) as rec:
                model(x)
    torch.cuda.current_stream().wait_stream(stream)
    ref = S.summarize_now(expected.detach().cpu())
    assert rec["0"].min == pytest.approx(ref.min, rel=1e-6) and rec["0"].min < 0
    assert rec["0"].rms == pytest.approx(ref.rms, rel=1e-5)
    assert rec["1"].min == 0.0 and rec["2"].absmax == rec["1"].absmax
    pending = {p.key: p.vector for p in rec._pending}
    assert pending["2"] is pending["1"]  # Identity: the same summary, no second launch
