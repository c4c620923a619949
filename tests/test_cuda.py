"""CUDA behaviour: fused on-device statistics, no per-module sync, the story on a GPU."""
import pytest
import torch

import torchprobe as tp
from torchprobe.models.detector import build_detector
from torchprobe.stats import Summarizer, read
from conftest import assert_unchanged, snapshot

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
