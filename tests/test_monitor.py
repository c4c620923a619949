"""Tests of torchprobe.monitor: sampling cadence, hook hygiene, values, gradients, warnings, files."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchprobe.errors import InvalidArgument
from torchprobe.formats import FP16_MAX, FP16_MIN_SUBNORMAL
from torchprobe.monitor import (
    GradStats,
    HeadroomTrendWarning,
    HeadroomWarning,
    LowHeadroomWarning,
    MarginHistory,
    MarginWarning,
    Monitor,
    MonitorHistory,
)


class Branchy(nn.Module):
    """``grow`` reads the input directly, so nothing upstream of it trains; ``stem``/``side`` do not
    depend on it; ``act`` (in-place), ``head`` and the root do."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.side = nn.Linear(16, 16)
        self.side_act = nn.ReLU()
        self.grow = nn.Linear(8, 16)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.grow(x))
        b = self.side_act(self.side(self.stem(x)))
        return self.head(torch.cat([a, b], dim=1))


class Pytreeish(nn.Module):
    """Dict and tuple outputs, integer leaves, and a module (``shared``) called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.split = Split()

    def forward(self, x: torch.Tensor) -> dict:
        y = self.shared(self.shared(x))
        lo, hi = self.split(y)
        return {"lo": lo, "hi": hi, "n": torch.tensor(len(x))}


@dataclasses.dataclass
class Halves:  # a plain dataclass, unknown to pytree
    small: torch.Tensor
    label: str = "halves"


class Split(nn.Module):
    def forward(self, y: torch.Tensor) -> tuple:
        return (Halves(y * 0.5), {"big": y * 100.0, "index": torch.arange(3)})


def no_forward_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def float64_absmax(t: torch.Tensor) -> float:
    t = t.detach().double()
    return t[torch.isfinite(t)].abs().max().item()


class Float64Recorder:
    """The independent computation: plain forward hooks, abs().max() in float64, max over calls."""

    def __init__(self, model: nn.Module) -> None:
        self.values: dict[tuple[str, int], float] = {}
        self.step = 0
        self.handles = [m.register_forward_hook(self._hook(name or "(root)")) for name, m in model.named_modules()]

    def _hook(self, name):
        def hook(module, args, out):
            leaves = [t for t in torch.utils._pytree.tree_flatten(out)[0]
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
            value = max(float64_absmax(t) for t in leaves)
            key = (name, self.step)
            self.values[key] = max(self.values.get(key, 0.0), value)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def train_growing(steps: int, every: int = 1, trend_window: int = 4, recorder: bool = False):
    """SGD on ``Branchy`` while ``grow.weight`` doubles after every step (one bit of headroom lost per
    step); returns the model, the monitor and (optionally) the float64 recorder."""
    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    rec = Float64Recorder(model) if recorder else None
    with Monitor(model, every=every, trend_window=trend_window) as mon:
        for step in range(steps):
            mon.step()
            if rec is not None:
                rec.step = step
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.grow.weight.mul_(2.0)
    if rec is not None:
        rec.close()
    return model, mon, rec


DEPENDENTS = {"grow", "act", "head", "(root)"}


def test_growing_layer_warns_trend_then_low_for_it_and_its_dependents_only():
    with pytest.warns(HeadroomWarning) as caught:
        model, mon, rec = train_growing(steps=16, recorder=True)
    ours = [w for w in caught if issubclass(w.category, HeadroomWarning)]
    seen = [(w.message.kind, w.message.module) for w in ours]
    assert sorted(seen) == sorted((kind, m) for kind in ("trend", "low-headroom") for m in DEPENDENTS)
    for module in DEPENDENTS:
        trend = next(w for w in ours if w.message.module == module and w.category is HeadroomTrendWarning)
        low = next(w for w in ours if w.message.module == module and w.category is LowHeadroomWarning)
        assert trend.message.step < low.message.step  # the early warning comes first
        assert low.message.absmax > FP16_MAX / 4  # below headroom_bits=2
        assert low.message.headroom < 2.0 < trend.message.headroom
        text = str(low.message)
        assert repr(module) in text and f"step {low.message.step}" in text and "FP32" in text and "tp.report" in text
        assert "around step" in str(trend.message)
        assert trend.filename == __file__  # warnings point at the training loop, not at torchprobe
    # the monitor's values are the float64 abs().max() of every module output at every step
    hist = mon.history
    assert hist.steps == tuple(range(16))
    for m in hist:
        assert len(m) == 16
        for s in m.samples:
            assert s.absmax == rec.values[(m.module, s.step)]
            assert s.nonfinite == 0
            assert s.headroom_bits == pytest.approx(math.log2(FP16_MAX / s.absmax))
            assert s.grad is None
    # grow loses one bit per step; the side branch stays flat
    assert hist["grow"].trend(4) == pytest.approx(-1.0, abs=0.02)
    assert abs(hist["side"].trend(4)) < 0.05
    assert {m.module for m in hist.least_headroom(4)} == DEPENDENTS


def test_trend_is_measured_per_sample_when_sampling_every_few_steps():
    with pytest.warns(HeadroomWarning) as caught:
        _, mon, _ = train_growing(steps=16, every=2, trend_window=3)
    assert mon.history.steps == tuple(range(0, 16, 2))
    trend = next(w.message for w in caught if w.category is HeadroomTrendWarning and w.message.module == "grow")
    assert trend.step % 2 == 0 and "falls 2.00 bits per sample" in str(trend)


def test_warnings_once_per_module_and_kind():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_growing(steps=20)
    ours = [(w.message.kind, w.message.module) for w in caught if issubclass(w.category, HeadroomWarning)]
    assert len(ours) == len(set(ours)) == 8


def test_no_trend_warning_for_flat_or_slowly_falling_headroom():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeadroomWarning)
        with Monitor(model, every=1, trend_window=5) as mon:
            for _ in range(12):
                mon.step()
                model(x)
                with torch.no_grad():  # loses 0.1 bit per step from ~15 bits: zero is 150 steps away
                    model[2].weight.mul_(2**0.1)
                    model[2].bias.mul_(2**0.1)
    assert mon.history["2"].trend(5) == pytest.approx(-0.1, abs=1e-3)


def test_sampling_cadence_and_no_hooks_between_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    inside = []
    probe = model[2].register_forward_pre_hook(lambda m, a: inside.append(len(model[0]._forward_hooks)))
    with Monitor(model, every=3) as mon:
        for step in range(10):
            sampled = mon.step()
            assert sampled == (step % 3 == 0) == mon.sampling
            if not sampled:
                assert no_forward_hooks(model)
            model(x).sum().backward()
    probe.remove()
    assert inside == [1 if s % 3 == 0 else 0 for s in range(10)]  # seen from inside the forward pass
    assert mon.history.steps == (0, 3, 6, 9)
    assert mon.step_index == 9
    assert no_forward_hooks(model)


def test_close_removes_hooks_also_when_the_body_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ZeroDivisionError):
        with Monitor(model, every=1) as mon:
            mon.step()
            model(torch.randn(2, 4))
            assert not no_forward_hooks(model)
            1 / 0
    assert no_forward_hooks(model) and mon.closed
    assert mon.history.steps == (0,)  # what ran before the error is kept
    mon.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        mon.step()

    mon = Monitor(model, every=1)
    mon.step()
    mon.close()
    assert no_forward_hooks(model)


def test_gradient_hooks_are_removed_with_the_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = Monitor(model, every=2, grads=True)
    mon.step()
    out = model(torch.randn(2, 4))
    assert out._backward_hooks
    mon.step()  # step 1 is not sampled: the gradient of step 0's graph arrives too late
    assert not out._backward_hooks
    out.sum().backward()
    mon.close()
    assert all(s.grad is None for m in mon.history for s in m.samples)


def _grad_stats(g: torch.Tensor) -> GradStats:
    g = g.double()
    a = g.abs()
    return GradStats(absmax=a.max().item(), tiny=int(((a > 0) & (a < FP16_MIN_SUBNORMAL)).sum()),
                     zeros=int((g == 0).sum()), nonfinite=0, numel=g.numel())


def test_grad_stats_match_autograd_with_inplace_relu_after_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    reference[1] = nn.ReLU()  # same function, no in-place op
    x = torch.randn(5, 8)
    scale = torch.tensor([1.0, 1e-9, 3e-8, 2.0])  # half the output grads would flush in FP16

    outs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n or "(root)", o))
               for n, m in reference.named_modules()]
    ref_loss = (reference(x) * scale).sum()
    for h in handles:
        h.remove()
    names = list(outs)
    expected = dict(zip(names, (_grad_stats(g) for g in torch.autograd.grad(ref_loss, [outs[n] for n in names]))))

    with Monitor(model, every=1, grads=True) as mon:
        mon.step()
        (model(x) * scale).sum().backward()
    hist = mon.history
    assert hist.grads
    for name in names:
        got = hist[name].last.grad
        assert got is not None, name
        assert got.absmax == pytest.approx(expected[name].absmax, rel=1e-6), name
        assert (got.tiny, got.zeros, got.nonfinite, got.numel) == (
            expected[name].tiny, expected[name].zeros, 0, expected[name].numel), name
    # the Linear before the in-place ReLU gets the gradient of its own (pre-ReLU) output
    assert hist["2"].last.grad.tiny == 10 and hist["0"].last.grad.zeros == expected["0"].zeros > 0
    assert hist["0"].last.grad.tiny_fraction == pytest.approx(expected["0"].tiny / 80)


def test_grad_stats_of_a_crafted_gradient():
    model = nn.Sequential(nn.Identity(), nn.Linear(2, 2))  # the Linear output gets exactly `grad`
    grad = torch.tensor([[0.0, -0.0], [1e-9, -3e-8], [2.0**-24, 5.0], [float("nan"), float("-inf")]])
    with Monitor(model, every=1, grads=True, include="1") as mon:
        mon.step()
        model(torch.randn(4, 2)).backward(grad)
    g = mon.history["1"].last.grad
    assert g == GradStats(absmax=5.0, tiny=2, zeros=2, nonfinite=2, numel=8)
    assert (g.tiny_fraction, g.zero_fraction) == (0.25, 0.25)


class Cast(nn.Module):
    def __init__(self, dtype: torch.dtype, scale: float) -> None:
        super().__init__()
        self.dtype, self.scale = dtype, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).to(self.dtype)


class Dtypes(nn.Module):
    """One child per output dtype; the float64 one also holds an Inf and a NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fp16 = Cast(torch.float16, 1000.0)
        self.bf16 = Cast(torch.bfloat16, -3e5)
        self.f64 = Cast(torch.float64, 7.0)
        self.f8 = Cast(torch.float8_e5m2, 1.0)
        self.int = Cast(torch.int64, 10.0)

    def forward(self, x: torch.Tensor) -> dict:
        y = x.clone()
        y[0], y[1] = float("inf"), float("nan")
        return {n: getattr(self, n)(y if n == "f64" else x) for n in ("fp16", "bf16", "f64", "f8", "int")}


def test_every_floating_dtype_is_measured():
    torch.manual_seed(0)
    x = torch.randn(64)
    model = Dtypes()
    with pytest.warns(LowHeadroomWarning) as caught:
        with Monitor(model, every=1) as mon:
            mon.step()
            outs = model(x)
    hist = mon.history
    for name in ("fp16", "bf16", "f64", "f8"):
        assert hist[name].last.absmax == float64_absmax(outs[name]), name
        assert hist[name].last.nonfinite == (2 if name == "f64" else 0), name
    assert hist.unvisited() == ("int",)  # integer outputs have no FP16 headroom
    assert hist["bf16"].last.headroom_bits < 0  # beyond 65504: overflow in FP16
    assert {w.message.module for w in caught} == {"bf16", "f64", "(root)"}


def test_grads_true_without_autograd_records_activations_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)).eval()
    with Monitor(model, every=1, grads=True) as mon:
        mon.step()
        with torch.no_grad():
            model(torch.randn(2, 4))
    assert all(s.grad is None and s.absmax > 0 for m in mon.history for s in m.samples)


def test_pytree_outputs_shared_module_and_nonfinite_values():
    torch.manual_seed(0)
    model = Pytreeish()
    x = torch.randn(6, 4)
    x[0, 0] = float("nan")
    with pytest.warns(LowHeadroomWarning, match="NaN/Inf") as caught:
        with Monitor(model, every=1) as mon:
            mon.step()
            model(x)
    with torch.no_grad():
        first = model.shared(x)
        second = model.shared(first)
    hist = mon.history
    # called twice: absmax is the max over calls, NaN counts add up
    shared = hist["shared"].last
    assert shared.absmax == max(float64_absmax(first), float64_absmax(second))
    assert shared.nonfinite == int((~first.isfinite()).sum() + (~second.isfinite()).sum()) > 0
    # several floating leaves (integer leaves ignored): one value for the module
    split = hist["split"].last
    assert split.absmax == float64_absmax(second * 100.0)
    assert split.nonfinite == 2 * int((~second.isfinite()).sum())  # the dataclass leaf counts too
    assert hist["(root)"].last.absmax == split.absmax
    assert {w.message.module for w in caught} == {"shared", "split", "(root)"}


def test_include_exclude_and_argument_checks():
    model = Pytreeish()
    assert Monitor(model).modules == ("(root)", "shared", "split")
    assert Monitor(model, include="s*").modules == ("shared", "split")
    assert Monitor(model, include=["(root)", "split"], exclude="split").modules == ("(root)",)
    with pytest.raises(InvalidArgument, match="no module to monitor.*'shared'"):
        Monitor(model, include="encoder.*")
    for bad in ({"every": 0}, {"every": 1.5}, {"trend_window": 1}, {"headroom_bits": -1}, {"include": [3]}):
        with pytest.raises(InvalidArgument):
            Monitor(model, **bad)
    with pytest.raises(InvalidArgument, match="nn.Module"):
        Monitor(lambda x: x)


def test_model_is_not_changed():
    torch.manual_seed(0)
    model = Branchy().eval()
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    with Monitor(model, every=1, grads=True) as mon:
        for _ in range(3):
            mon.step()
            model(torch.randn(4, 8)).sum().backward()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert [m.training for m in model.modules()] == flags
    assert no_forward_hooks(model)
    assert all(not m._backward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_history_read_mid_step_is_provisional_then_final():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    with Monitor(model, every=1, grads=True) as mon:
        mon.step()
        out = model(torch.randn(3, 4))
        early = mon.history["0"].last
        assert early.step == 0 and early.grad is None  # backward has not run yet
        out.sum().backward()
        mon.step()
    late = mon.history["0"].samples[0]
    assert late.absmax == early.absmax and late.grad is not None and late.grad.numel == 12
    assert late.grad.absmax == 1.0 and late.grad.zeros == 0


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()  # all-zero output: infinite headroom must survive strict JSON
    with Monitor(model, every=2, grads=True) as mon:
        for _ in range(5):
            mon.step()
            model(torch.randn(3, 4)).sum().backward()
    path = tmp_path / "headroom.json"
    mon.save(path)
    assert os.listdir(tmp_path) == ["headroom.json"]  # no temporary file left behind
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    assert path.stat().st_mode == plain.stat().st_mode  # the mode open() gives, not mkstemp's 0o600
    plain.unlink()
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    loaded = Monitor.load(path)
    assert isinstance(loaded, MonitorHistory)
    assert loaded == mon.history
    assert loaded["2"].last.headroom_bits == math.inf and loaded["0"].last.grad is not None
    assert (loaded.every, loaded.grads, loaded.steps) == (2, True, (0, 2, 4))
    assert str(loaded) == str(mon)

    mon.save(path)  # overwrite in place
    assert Monitor.load(path) == loaded
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(InvalidArgument, match="torchprobe monitor history"):
        Monitor.load(bad)
    bad.write_text("not json")
    with pytest.raises(InvalidArgument, match="not a JSON monitor history"):
        Monitor.load(bad)


def test_str_lists_least_headroom_first():
    _, mon, _ = train_growing(steps=6)
    text = str(mon)
    lines = text.splitlines()
    assert lines[0].startswith("Monitor: 7 modules, 6 samples (every 1 step)")
    assert lines[1].split()[:3] == ["module", "step", "absmax"]
    rows = [line.split()[0] for line in lines[3:]]
    assert set(rows[:4]) == DEPENDENTS and set(rows[4:]) == {"stem", "side", "side_act"}
    assert "no samples yet" in str(Monitor(nn.Linear(2, 2)))
    assert "module" in str(train_growing(steps=2)[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to check that sampling never syncs")
def test_cuda_sampled_step_does_not_sync():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 8)).cuda()
    x = torch.randn(32, 64, device="cuda")
    with Monitor(model, every=1, grads=True) as mon:
        mon.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        mon.step()
    hist = mon.history
    with torch.no_grad():
        h = model[0](x)
    assert hist["0"].samples[0].absmax == float64_absmax(h)
    assert hist["2"].samples[0].grad.absmax == 1.0


# -- margins under a target -------------------------------------------------------------------------

# The ONNX (opset < 17) -> TensorRT path (layer_norm decomposed into FP16 primitives); at merge this
# becomes "strict-onnx:fp16".
ONNX_PATH = "strict-onnx:fp16"  # the target that decomposes layer_norm into FP16 primitives


class GrowingNorm(nn.Module):
    """``grow`` feeds a LayerNorm; multiplying its weight and bias by 1.25 after every step grows the
    LayerNorm's centred input 1.25-fold, so its decomposed FP16 variance nears overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.grow = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.grow(x)))


def test_margin_of_a_growing_layernorm_is_sampled_and_warns_before_it_breaks():
    torch.manual_seed(0)
    model = GrowingNorm()
    with torch.no_grad():
        model.grow.weight.mul_(8.0)
        model.grow.bias.mul_(8.0)
    x = torch.randn(16, 8)
    centred = {}
    step = [0]

    def pre(module, args):  # the independent computation: a plain hook, float64
        a = args[0].detach().double()
        centred[step[0]] = (a - a.mean(-1, keepdim=True)).abs().max().item()

    probe = model.norm.register_forward_pre_hook(pre)
    recorder = Float64Recorder(model)
    with pytest.warns(HeadroomWarning) as caught:
        with Monitor(model, every=1, trend_window=3, target=ONNX_PATH, margin_every=2, margin_modules=2) as mon:
            for step[0] in range(16):
                recorder.step = step[0]
                mon.step()
                model(x).sum().backward()
                with torch.no_grad():
                    model.grow.weight.mul_(1.25)
                    model.grow.bias.mul_(1.25)
                model.zero_grad()
    probe.remove()
    recorder.close()
    assert no_forward_hooks(model) and all(not m._forward_pre_hooks for m in model.modules()) and model.training

    hist = mon.history
    norm = hist.margin("norm")
    assert norm.steps == tuple(range(0, 16, 2))
    for point in norm.points:
        predicted = math.sqrt(FP16_MAX) / centred[point.step]
        if predicted < 1:  # broken already: the search starts at x1
            assert point.factor == 1.0
        else:
            assert predicted * 0.99 <= point.factor <= predicted * 1.06, (point, predicted)
        assert point.reason == "overflow"
    assert MarginHistory("norm", norm.points[:-1]).trend(3) == pytest.approx(-math.log2(1.25), rel=0.05)  # bits per step
    # the first margin sample scans every leaf, the later ones follow the two weakest
    assert sorted(len(m) for m in hist.margins) == [1, 8, 8]
    # margin() ran inside the sampled forward on copies of the model: headroom stayed exact
    for m in hist:
        for s in m.samples:
            assert s.absmax == recorder.values[(m.module, s.step)]

    ours = [w.message for w in caught if isinstance(w.message, MarginWarning)]
    assert [(w.kind, w.module) for w in ours] == [("margin-trend", "norm"), ("low-margin", "norm")]
    trend, low = ours
    breaks_at = min(s for s, c in centred.items() if c > math.sqrt(FP16_MAX))  # first step it is broken
    assert f"at this rate norm breaks under {ONNX_PATH} around step" in str(trend)
    predicted_step = int(str(trend).split("around step ")[1].split(".")[0])
    assert abs(predicted_step - breaks_at) <= 1 and trend.step < breaks_at
    assert trend.step < low.step < breaks_at and low.factor < 2.0 <= trend.factor
    assert low.headroom == pytest.approx(math.log2(low.factor)) and low.target == ONNX_PATH
    assert "x" in str(low) and "min_margin=2" in str(low)
    text = str(mon)
    assert f"Margin under {ONNX_PATH} (every 2 samples), warn below x2" in text
    lines = text.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("Margin under"))) + 3
    assert [line.split()[0] for line in lines[first:]] == ["norm", "grow", "head"]  # smallest latest factor first


def test_margin_history_roundtrips_and_monitor_margin_arguments(tmp_path):
    torch.manual_seed(0)
    model = GrowingNorm()
    x = torch.randn(4, 8) * 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HeadroomWarning)
        with Monitor(model, every=2, target=ONNX_PATH, margin_every=1) as mon:
            for _ in range(3):
                mon.step()
                model(x)
    path = tmp_path / "m.json"
    mon.save(path)
    loaded = Monitor.load(path)
    assert loaded == mon.history and loaded.target == ONNX_PATH and loaded.margin("norm").steps == (0, 2)
    assert str(loaded) == str(mon)
    for bad in ({"target": "strict:fp17"}, {"target": "fp32"}, {"target": ONNX_PATH, "min_margin": 0.5},
                {"target": ONNX_PATH, "margin_every": 0}, {"target": ONNX_PATH, "margin_modules": 1.5}):
        with pytest.raises(InvalidArgument):
            Monitor(model, **bad)
