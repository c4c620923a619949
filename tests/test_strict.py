"""torchprobe.targets.strict: decompositions, overflow evidence, FP32 accumulation, real layers."""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchprobe.errors import InvalidArgument
from torchprobe.targets.strict import StrictBackend, StrictCall, strict_mode

FP16, BF16 = torch.float16, torch.bfloat16


def rel_l2(test: torch.Tensor, ref: torch.Tensor) -> float:
    return float((test.double() - ref.double()).norm() / ref.double().norm())


def randn(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


# ---------------------------------------------------------------- decompositions on benign inputs
# case(id, composite, inputs, call, independent float64 formula)

def _ln64(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / ((x - mean).pow(2).mean(-1, keepdim=True) + eps).sqrt() * w + b


def _gn64(x, groups, w, b, eps=1e-5):
    g = x.reshape(x.shape[0], groups, -1)
    mean = g.mean(-1, keepdim=True)
    y = ((g - mean) / ((g - mean).pow(2).mean(-1, keepdim=True) + eps).sqrt()).reshape(x.shape)
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _softmax64(x, dim):
    e = (x - x.max(dim, keepdim=True).values).exp()
    return e / e.sum(dim, keepdim=True)


def _var64(x, dim, correction, keepdim=False):
    n = x.shape[dim] if dim is not None else x.numel()
    dims = dim if dim is not None else tuple(range(x.dim()))
    return ((x - x.mean(dims, keepdim=True)) ** 2).sum(dims, keepdim=keepdim) / (n - correction)


def _sdpa64(q, k, v, mask=None, scale=None):
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    return _softmax64(s, -1) @ v


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
    case("F.softmax", "softmax", [randn(4, 50, scale=3)], lambda x: F.softmax(x, dim=-1), lambda x: _softmax64(x, -1)),
    case("torch.softmax-dim0", "softmax", [randn(7, 5, scale=3)], lambda x: torch.softmax(x, 0),
         lambda x: _softmax64(x, 0)),
    case("Tensor.softmax", "softmax", [randn(3, 8, scale=3)], lambda x: x.softmax(dim=-1), lambda x: _softmax64(x, -1)),
    case("F.log_softmax", "log_softmax", [randn(4, 50, scale=3)], lambda x: F.log_softmax(x, -1),
         lambda x: _softmax64(x, -1).log()),
    case("Tensor.log_softmax", "log_softmax", [randn(4, 9)], lambda x: x.log_softmax(1),
         lambda x: _softmax64(x, 1).log()),
    case("gelu-erf", "gelu", [randn(8, 64, scale=3)], F.gelu,
         lambda x: 0.5 * x * (1 + torch.special.erf(x / math.sqrt(2)))),
    case("gelu-tanh", "gelu", [randn(8, 64, scale=3)], lambda x: F.gelu(x, approximate="tanh"),
         lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    case("torch.var-dim", "var", [randn(4, 40, shift=3)], lambda x: torch.var(x, -1), lambda x: _var64(x, -1, 1)),
    case("Tensor.var-correction0", "var", [X], lambda x: x.var(dim=1, correction=0, keepdim=True),
         lambda x: _var64(x, 1, 0, keepdim=True)),
    case("torch.var-unbiased-false", "var", [X], lambda x: torch.var(x, False), lambda x: _var64(x, None, 0)),
    case("torch.std-all", "std", [X], torch.std, lambda x: _var64(x, None, 1).sqrt()),
    case("Tensor.std-dim-unbiased-keepdim", "std", [X], lambda x: x.std(1, True, True),
         lambda x: _var64(x, 1, 1, keepdim=True).sqrt()),
    case("torch.norm", "vector_norm", [X], lambda x: torch.norm(x, dim=-1), lambda x: x.pow(2).sum(-1).sqrt()),
    case("Tensor.norm-p1", "vector_norm", [X], lambda x: x.norm(p=1, dim=1), lambda x: x.abs().sum(1)),
    case("vector_norm-p3", "vector_norm", [X], lambda x: torch.linalg.vector_norm(x, 3, dim=-1),
         lambda x: x.abs().pow(3).sum(-1).pow(1 / 3)),
    case("vector_norm-inf", "vector_norm", [X], lambda x: torch.linalg.vector_norm(x, math.inf),
         lambda x: x.abs().max()),
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
    case("sdpa-gqa", SDPA, [randn(1, 4, 6, 8), randn(1, 2, 6, 8, seed=1), randn(1, 2, 6, 8, seed=2)],
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
         lambda q, k, v: _sdpa64(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))),
]


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("composite, inputs, call, ref64", CASES)
def test_decomposition_matches_float64_and_pytorch(composite, inputs, call, ref64, dtype):
    low = [t.to(dtype) for t in inputs]
    with strict_mode(dtype) as ev:
        strict = call(*low)
    eager = call(*low)
    ref = ref64(*[t.to(dtype).double() for t in inputs])  # same rounded inputs, exact math

    assert ev.decomposed == Counter({composite: 1})
    assert strict.dtype == dtype and strict.shape == eager.shape
    eps = torch.finfo(dtype).eps
    scale = float(ref.abs().max())
    # within storage precision of the exact result, and a few ulps of PyTorch's own op
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
    with strict_mode(FP16):
        strict = F.layer_norm(x, (32,), w, b)
    assert torch.equal(strict, expected)
    assert not torch.equal(strict, F.layer_norm(x, (32,), w, b))  # PyTorch rounds once, at the end


# ---------------------------------------------------------------- overflow evidence

def test_layer_norm_overflow_hidden_by_pytorch_found_by_strict():
    torch.manual_seed(0)
    ln = nn.LayerNorm(64)
    nn.init.normal_(ln.weight, 1.0, 0.1)
    nn.init.normal_(ln.bias, 0.0, 0.1)
    x = randn(8, 64, scale=1000)  # absmax ~3000: (x - mean)^2 ~ 1e7 > 65504
    with torch.no_grad():
        ref = ln(x)
        ln16, x16 = copy.deepcopy(ln).half(), x.half()
        assert rel_l2(ln16(x16), ref) < 1e-2  # PyTorch's FP16 layer_norm keeps the variance in FP32
        with strict_mode(FP16) as ev:
            strict = ln16(x16)
        with strict_mode(FP16, fused_norms=True) as fused_ev:
            fused = ln16(x16)

    assert not torch.isfinite(strict).all() or rel_l2(strict, ref) > 0.5
    (event,) = ev.events()
    assert event.op == "layer_norm/pow" and event.what == "(x-mean)^2"
    centered = (x16 - x16.float().mean(-1, keepdim=True).half()).float()
    assert event.count == int((centered.square() > 65504).sum())
    assert event.input_absmax == pytest.approx(float(centered.abs().max()), rel=1e-3)
    assert str(event).startswith("layer_norm: (x-mean)^2 overflowed FP16 (")

    assert rel_l2(fused, ref) < 1e-2
    assert fused_ev.events() == []


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
    with strict_mode(FP16) as ev:
        strict = call(x)
    events = ev.events()
    assert events[0].op == op and events[0].count > 0
    assert events[0].input_absmax == pytest.approx(value, rel=1e-3)
    assert torch.equal(strict, call(x)) is not harmful


def test_masking_to_minus_inf_is_not_an_overflow():
    q = randn(1, 2, 6, 8, scale=10).half()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    additive = torch.zeros(6, 6, dtype=FP16).masked_fill(~causal, torch.finfo(FP16).min)  # HF-style mask
    scores = (q.float() @ q.float().transpose(-2, -1)) / math.sqrt(8)
    assert (scores[..., ~causal] + torch.finfo(FP16).min < -65520).any()  # some masked scores round to -inf
    with strict_mode(FP16) as ev:
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=additive)
        ref = F.scaled_dot_product_attention(q, q, q, attn_mask=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert ev.events() == []


def test_inherited_inf_is_not_blamed():
    x = randn(2, 16).half()
    x[0, 3] = math.inf  # came in from upstream
    with strict_mode(FP16) as ev:
        y = F.gelu(F.layer_norm(x, (16,)))
    assert not torch.isfinite(y[0]).any() and torch.isfinite(y[1]).all()
    assert ev.events() == []


# ---------------------------------------------------------------- FP32 accumulation of matmul/conv

def _fp16_accumulate(a: torch.Tensor, b: torch.Tensor) -> float:
    """a @ b (a row times a column) with every partial sum rounded to FP16."""
    acc = torch.zeros((), dtype=FP16)
    for p in (a.double().flatten() * b.double().flatten()).tolist():
        acc = (acc.double() + p).half()
    return float(acc)


def test_matmul_and_conv_accumulate_in_fp32():
    n = 4096
    a = torch.rand(1, n, generator=torch.Generator().manual_seed(0)).half() * 0.5 + 0.5
    b = torch.rand(n, 1, generator=torch.Generator().manual_seed(1)).half() * 0.5 + 0.5
    exact = float(a.double() @ b.double())
    fp16_acc = _fp16_accumulate(a, b)
    assert abs(fp16_acc - exact) > 200  # the FP16 running sum stalls at 2048 (ulp 2 > each product)

    with strict_mode(FP16) as ev:
        mm = a @ b
        linear = F.linear(a, b.T, torch.ones(1, dtype=FP16))
        conv = F.conv1d(a.view(1, 1, n), b.view(1, 1, n))
        batched = torch.bmm(a.expand(2, 1, n), b.expand(2, n, 1))
    assert torch.equal(mm, (a.float() @ b.float()).half())
    assert torch.equal(linear, (a.float() @ b.float() + 1).half())
    assert torch.equal(conv, F.conv1d(a.float().view(1, 1, n), b.float().view(1, 1, n)).half())
    assert torch.equal(batched[0], mm)
    assert abs(float(mm) - exact) <= 2  # one FP16 rounding of a ~3000 value
    assert ev.events() == []


def test_matmul_output_overflow_is_recorded():
    a, b = torch.full((2, 64), 100.0, dtype=FP16), torch.full((64, 3), 100.0, dtype=FP16)
    with strict_mode(FP16) as ev:
        out = a @ b  # 640000 in FP32, Inf once stored in FP16
    assert torch.isinf(out).all()
    (event,) = ev.events()
    assert (event.op, event.count, event.input_absmax) == ("matmul/mm", 6, 100.0)


# ---------------------------------------------------------------- real layers

def _hooked(model: nn.Module, fired: list[str]) -> list:
    return [m.register_forward_hook(lambda *_, n=n: fired.append(n)) for n, m in model.named_modules() if n]


def test_transformer_encoder_layer_runs_with_hooks_and_modest_error():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, activation="gelu", batch_first=True).eval()
    x = randn(2, 16, 64)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 12:] = True
    half, fired = copy.deepcopy(layer).half(), []
    handles = _hooked(half, fired)
    try:
        with torch.no_grad():
            ref = layer(x, src_key_padding_mask=pad)
            with strict_mode(FP16) as ev:
                out = half(x.half(), src_key_padding_mask=pad)
    finally:
        for h in handles:
            h.remove()
    assert rel_l2(out, ref) < 1e-2
    assert {"self_attn", "linear1", "linear2", "norm1", "norm2"} <= set(fired)
    assert ev.decomposed == Counter(layer_norm=2, scaled_dot_product_attention=1, gelu=1)
    assert ev.events() == []


@pytest.mark.parametrize("need_weights, composite", [(True, "softmax"), (False, "scaled_dot_product_attention")])
def test_multihead_attention_is_decomposed(need_weights, composite):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = randn(2, 10, 32)
    with torch.no_grad():
        ref = mha(x, x, x)[0]
        with strict_mode(FP16) as ev:
            out = copy.deepcopy(mha).half()(x.half(), x.half(), x.half(), need_weights=need_weights)[0]
    assert rel_l2(out, ref) < 1e-2
    assert ev.decomposed == Counter({composite: 1})


def test_bert_under_strict_fp16():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    half, fired = copy.deepcopy(model).half(), []
    handles = _hooked(half, fired)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state
            with strict_mode(FP16) as ev:
                out = half(input_ids=ids).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    assert rel_l2(out, ref) < 1e-2
    assert "encoder.layer.1.output.LayerNorm" in fired
    assert ev.decomposed["layer_norm"] == 5 and ev.decomposed["gelu"] == 2
    assert ev.decomposed["scaled_dot_product_attention"] + ev.decomposed["softmax"] == 2


# ---------------------------------------------------------------- FP32 islands and the backend

class _Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.ln = nn.Linear(16, 16), nn.LayerNorm(16)
        self.conv, self.bn, self.gn = nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.GroupNorm(2, 4)

    def forward(self, x):
        h = self.gn(F.gelu(self.ln(self.lin(x))) + self.bn(self.conv(x)))
        a = F.scaled_dot_product_attention(h, h, h, is_causal=True)
        return h.softmax(-1) + a + torch.var(h, -1, keepdim=True) + F.normalize(h, dim=-1) + F.rms_norm(h, (16,))


class _KeepFP32(nn.Module):
    """FP16 around an FP32 island, as a keep-FP32 precision plan builds it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.island, self.out = nn.Linear(16, 16), _Everything(), nn.Linear(16, 16)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.island(h.float()).to(h.dtype))


def test_fp32_island_is_bit_identical_to_a_plain_fp32_run():
    torch.manual_seed(0)
    model = _KeepFP32().eval().half()
    model.island.float()
    seen = {}
    handle = model.island.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        with torch.no_grad(), strict_mode(FP16) as ev:
            model(randn(2, 4, 16).half())
    finally:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(seen["y"], model.island(seen["x"]))
    assert not ev.decomposed  # only the FP16 linears ran under strict, through FP32 accumulation


def test_backend_wraps_a_module_and_keeps_the_latest_evidence():
    backend = StrictBackend()
    assert (backend.name, backend.cast_weights) == ("strict", True)
    ln16, x16 = nn.LayerNorm(64).half(), randn(4, 64, scale=1000).half()
    call = backend.wrap(ln16, FP16, (x16,), {})
    assert isinstance(call, StrictCall) and call.events is None
    with torch.no_grad():
        call(x16)
        assert [e.op for e in call.events.events()] == ["layer_norm/pow"]
        out = StrictBackend(fused_norms=True).wrap(ln16, FP16, (x16,), {})(x16)
    torch.testing.assert_close(out, ln16(x16), rtol=2e-3, atol=2e-3)


def test_fp32_and_invalid_dtypes():
    x = randn(4, 8)
    with strict_mode(torch.float32) as ev:
        assert torch.equal(F.layer_norm(x, (8,)), F.layer_norm(x, (8,)))
    assert not ev.decomposed
    with pytest.raises(InvalidArgument, match="fp64 is not emulated; valid dtypes: fp32, fp16, bf16"):
        with strict_mode(torch.float64):
            pass
