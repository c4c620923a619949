"""torchprobe.targets.strict_onnx: the ONNX (opset < 17) -> TensorRT parser path, FP16 enabled."""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchprobe.targets import parse_target
from torchprobe.targets.strict import StrictCall
from torchprobe.targets.strict_onnx import StrictOnnxBackend, onnx_mode

FP16, BF16 = torch.float16, torch.bfloat16


def rel_l2(test: torch.Tensor, ref: torch.Tensor) -> float:
    return float((test.double() - ref.double()).norm() / ref.double().norm())


def randn(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _ln64(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / ((x - mean).pow(2).mean(-1, keepdim=True) + eps).sqrt() * w + b


def _gn64(x, groups, w, b, eps=1e-5):
    g = x.reshape(x.shape[0], groups, -1)
    mean = g.mean(-1, keepdim=True)
    y = ((g - mean) / ((g - mean).pow(2).mean(-1, keepdim=True) + eps).sqrt()).reshape(x.shape)
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _var64(x, dim, correction, keepdim=False):
    n = x.shape[dim] if dim is not None else x.numel()
    dims = dim if dim is not None else tuple(range(x.dim()))
    return ((x - x.mean(dims, keepdim=True)) ** 2).sum(dims, keepdim=keepdim) / (n - correction)


def _sdpa64(q, k, v, mask=None, scale=None):
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, -1) @ v


def _bn64(x, m, v, w, b):
    m, v, w, b = (t.view(1, -1, 1, 1) for t in (m, v, w, b))
    return (x - m) / (v + 1e-5).sqrt() * w + b


def case(id_, composite, inputs, call, ref64):
    return pytest.param(composite, inputs, call, ref64, id=id_)


SDPA = "scaled_dot_product_attention"
QKV = [randn(2, 3, 6, 16, seed=s) for s in (0, 1, 2)]
CAUSAL = torch.ones(6, 6, dtype=torch.bool).tril()
KEEP = (randn(6, 6, seed=9) > -0.8).index_fill(1, torch.tensor([0]), True)  # every row attends somewhere
X = randn(4, 40)

CASES = [
    case("layer_norm", "layer_norm", [randn(4, 32, shift=2), randn(32, seed=1, scale=0.1, shift=1), randn(32, seed=2)],
         lambda x, w, b: F.layer_norm(x, (32,), w, b), _ln64),
    case("layer_norm-2d-shape", "layer_norm", [randn(3, 5, 16)],
         lambda x: F.layer_norm(x, [5, 16], eps=1e-3), lambda x: F.layer_norm(x, [5, 16], eps=1e-3)),
    case("group_norm", "group_norm", [randn(2, 8, 4, 4), randn(8, seed=1, shift=1), randn(8, seed=2)],
         lambda x, w, b: F.group_norm(x, 4, w, b), lambda x, w, b: _gn64(x, 4, w, b)),
    case("instance_norm", "instance_norm", [randn(2, 4, 5, 5), randn(4, seed=1, shift=1), randn(4, seed=2)],
         lambda x, w, b: F.instance_norm(x, weight=w, bias=b), lambda x, w, b: _gn64(x, 4, w, b)),
    case("batch_norm", "batch_norm",
         [randn(2, 6, 3, 3, scale=2, shift=1), randn(6, seed=1), randn(6, seed=2).abs() + 0.5, randn(6, seed=3),
          randn(6, seed=4)],
         lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, training=False), _bn64),
    case("rms_norm", "rms_norm", [randn(4, 32), randn(32, seed=1, shift=1)],
         lambda x, w: F.rms_norm(x, (32,), w, eps=1e-6),
         lambda x, w: x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w),
    case("F.log_softmax", "log_softmax", [randn(4, 50, scale=3)], lambda x: F.log_softmax(x, -1),
         lambda x: torch.softmax(x, -1).log()),
    case("gelu-erf", "gelu", [randn(8, 64, scale=3)], F.gelu,
         lambda x: 0.5 * x * (1 + torch.special.erf(x / math.sqrt(2)))),
    case("gelu-tanh", "gelu", [randn(8, 64, scale=3)], lambda x: F.gelu(x, approximate="tanh"),
         lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    case("torch.var-dim", "var", [randn(4, 40, shift=3)], lambda x: torch.var(x, -1), lambda x: _var64(x, -1, 1)),
    case("Tensor.var-correction0", "var", [X], lambda x: x.var(dim=1, correction=0, keepdim=True),
         lambda x: _var64(x, 1, 0, keepdim=True)),
    case("torch.std-all", "std", [X], torch.std, lambda x: _var64(x, None, 1).sqrt()),
    case("torch.norm", "vector_norm", [X], lambda x: torch.norm(x, dim=-1), lambda x: x.pow(2).sum(-1).sqrt()),
    case("Tensor.norm-p1", "vector_norm", [X], lambda x: x.norm(p=1, dim=1), lambda x: x.abs().sum(1)),
    case("vector_norm-p3", "vector_norm", [X], lambda x: torch.linalg.vector_norm(x, 3, dim=-1),
         lambda x: x.abs().pow(3).sum(-1).pow(1 / 3)),
    case("F.normalize", "normalize", [X], lambda x: F.normalize(x, dim=-1),
         lambda x: x / x.pow(2).sum(-1, keepdim=True).sqrt()),
    case("sdpa", SDPA, QKV, F.scaled_dot_product_attention, _sdpa64),
    case("sdpa-causal", SDPA, QKV, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
         lambda q, k, v: _sdpa64(q, k, v, CAUSAL)),
    case("sdpa-bool-mask-scale", SDPA, QKV,
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=KEEP, scale=0.3),
         lambda q, k, v: _sdpa64(q, k, v, KEEP, 0.3)),
    case("sdpa-float-mask", SDPA, [*QKV, randn(6, 6, seed=3)],
         lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), _sdpa64),
]


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("composite, inputs, call, ref64", CASES)
def test_rule_matches_float64_and_pytorch(composite, inputs, call, ref64, dtype):
    low = [t.to(dtype) for t in inputs]
    with onnx_mode(dtype) as ev:
        strict = call(*low)
    eager = call(*low)
    ref = ref64(*[t.to(dtype).double() for t in inputs])  # same rounded inputs, exact math

    assert ev.decomposed == Counter({composite: 1})
    assert strict.dtype == dtype and strict.shape == eager.shape
    eps = torch.finfo(dtype).eps
    scale = float(ref.abs().max())
    torch.testing.assert_close(strict.double(), ref, rtol=8 * eps, atol=8 * eps * scale)
    torch.testing.assert_close(strict.double(), eager.double(), rtol=4 * eps, atol=4 * eps * scale)
    assert ev.events() == []


def test_layer_norm_is_the_fp16_primitive_chain():
    x, w, b = randn(3, 32, scale=20, shift=100).half(), randn(32, seed=1).half(), randn(32, seed=2).half()
    eps = torch.tensor(1e-5, dtype=FP16).item()  # the constant as the engine stores it
    mean = x.float().mean(-1, keepdim=True).half()  # ReduceMean accumulates in FP32
    d = x - mean
    var = d.pow(2).float().mean(-1, keepdim=True).half()
    expected = d / (var + eps).sqrt() * w + b  # every op rounds to FP16
    with onnx_mode(FP16):
        strict = F.layer_norm(x, (32,), w, b)
    assert torch.equal(strict, expected)
    assert not torch.equal(strict, F.layer_norm(x, (32,), w, b))  # PyTorch rounds once, at the end


def test_layer_norm_overflow_hidden_by_pytorch_found_on_the_onnx_path():
    torch.manual_seed(0)
    ln = nn.LayerNorm(64)
    nn.init.normal_(ln.weight, 1.0, 0.1)
    nn.init.normal_(ln.bias, 0.0, 0.1)
    x = randn(8, 64, scale=1000)  # absmax ~3000: (x - mean)^2 ~ 1e7 > 65504
    with torch.no_grad():
        ref = ln(x)
        ln16, x16 = copy.deepcopy(ln).half(), x.half()
        assert rel_l2(ln16(x16), ref) < 1e-2  # PyTorch's FP16 layer_norm keeps the variance in FP32
        with onnx_mode(FP16) as ev:
            strict = ln16(x16)
        with onnx_mode(FP16, fused_norms=True) as fused_ev:
            fused = ln16(x16)

    assert not torch.isfinite(strict).all() or rel_l2(strict, ref) > 0.5
    (event,) = ev.events()
    assert event.op == "layer_norm/pow" and event.what == "(x-mean)^2"
    centered = (x16 - x16.float().mean(-1, keepdim=True).half()).float()
    assert event.count == int((centered.square() > 65504).sum())
    assert event.input_absmax == pytest.approx(float(centered.abs().max()), rel=1e-3)
    assert str(event).startswith("layer_norm: (x-mean)^2 overflowed FP16 (")
    assert rel_l2(fused, ref) < 1e-2 and fused_ev.events() == []


@pytest.mark.parametrize(
    "call, value, op, harmful",
    [
        (F.gelu, 40000.0, "gelu/mul_x", True),  # x * (1 + erf) = 2x
        (lambda x: F.gelu(x, approximate="tanh"), 300.0, "gelu/square", False),  # tanh(inf) = 1: recorded, harmless
        (lambda x: torch.linalg.vector_norm(x, dim=-1), 300.0, "vector_norm/square", True),
        (lambda x: F.rms_norm(x, (8,)), 300.0, "rms_norm/pow", True),
        (lambda x: torch.var(x, -1), 300.0, "var/square", True),
    ],
    ids=["gelu", "gelu-tanh", "vector_norm", "rms_norm", "var"],
)
def test_overflow_evidence_names_the_primitive(call, value, op, harmful):
    x = torch.zeros(2, 8, dtype=FP16)
    x[:, 0], x[:, 1] = value, -value  # mean 0, finite var/rms/norm, but x^2 > 65504
    assert torch.isfinite(call(x)).all()
    with onnx_mode(FP16) as ev:
        strict = call(x)
    events = ev.events()
    assert events[0].op == op and events[0].count > 0
    assert events[0].input_absmax == pytest.approx(value, rel=1e-3)
    assert torch.equal(strict, call(x)) is not harmful


def test_sdpa_splits_the_scale_over_q_and_k():
    q, k, v = (randn(1, 2, 4, 8, seed=s, scale=2).half() for s in (0, 1, 2))
    with onnx_mode(FP16):
        out = F.scaled_dot_product_attention(q, k, v)
    root = torch.tensor(math.sqrt(1 / math.sqrt(8)), dtype=FP16).double()  # Sqrt(scale), stored in FP16
    qs, ks = (q.double() * root).half(), (k.double() * root).half()
    scores = (qs.double() @ ks.double().transpose(-2, -1)).half()  # MatMul, FP32 accumulation, FP16 out
    expected = (torch.softmax(scores.double(), -1).half().double() @ v.double()).half()
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


def test_inherited_inf_is_not_blamed():
    x = randn(2, 16).half()
    x[0, 3] = math.inf  # came in from upstream
    with onnx_mode(FP16) as ev:
        y = F.gelu(F.layer_norm(x, (16,)))
    assert not torch.isfinite(y[0]).any() and torch.isfinite(y[1]).all()
    assert ev.events() == []


def test_matmul_and_conv_round_once_with_the_bias():
    n = 4096
    a = torch.rand(1, n, generator=torch.Generator().manual_seed(0)).half() * 0.5 + 0.5
    b = torch.rand(n, 1, generator=torch.Generator().manual_seed(1)).half() * 0.5 + 0.5
    with onnx_mode(FP16) as ev:
        mm = a @ b
        linear = F.linear(a, b.T, torch.ones(1, dtype=FP16))
        conv = F.conv1d(a.float().half().view(1, 1, n), b.view(1, 1, n))
    assert torch.equal(mm, (a.float() @ b.float()).half())
    assert torch.equal(linear, (a.float() @ b.float() + 1).half())
    assert torch.equal(conv, F.conv1d(a.float().view(1, 1, n), b.float().view(1, 1, n)).half())
    assert ev.events() == []


def test_backend_is_registered_as_strict_onnx():
    target = parse_target("strict-onnx:fp16")
    assert (target.backend, target.dtype, str(target)) == ("strict-onnx", FP16, "strict-onnx:fp16")
    backend = StrictOnnxBackend()
    assert (backend.name, backend.cast_weights) == ("strict-onnx", True)
    assert "opset < 17" in backend.describe()
    ln16, x16 = nn.LayerNorm(64).half(), randn(4, 64, scale=1000).half()
    call = backend.wrap(ln16, FP16, (x16,), {})
    assert isinstance(call, StrictCall) and call.events is None
    with torch.no_grad():
        call(x16)
        assert [e.op for e in call.events.events()] == ["layer_norm/pow"]
        out = StrictOnnxBackend(fused_norms=True).wrap(ln16, FP16, (x16,), {})(x16)
    torch.testing.assert_close(out, ln16(x16), rtol=2e-3, atol=2e-3)
