"""Verdicts that never lie: every wrong answer found on real models, as a test that stays fixed."""
import itertools
import math
import textwrap

import pytest
import torch
from torch import nn

import torchprobe as tp
from torchprobe.errors import InvalidArgument, NonFiniteReference, TorchprobeError
from torchprobe.kinds import FixOutcome, Reason

from conftest import assert_unchanged, snapshot
from test_cli import run_cli


# ----------------------------------------------------------------------------- 1. NaN reference
def nan_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("a", nn.Linear(8, 16))
    model.add_module("act", nn.ReLU())
    model.add_module("b", nn.Linear(16, 16))
    model.add_module("c", nn.Linear(16, 4))
    with torch.no_grad():
        model.b.weight[3, 5] = float("nan")
    return model


def test_metrics_never_drop_non_finite_values() -> None:
    ref = torch.tensor([1.0, float("nan"), 3.0])
    finite = torch.tensor([1.0, 2.0, 3.0])
    m = tp.measure(ref, finite)  # NaN on one side only: a mismatch, infinitely wrong
    assert m.nonfinite_mismatch == 1 and math.isinf(m.rel_l2) and math.isinf(m.max_abs) and not m.finite
    both = tp.measure(ref, ref.clone())  # NaN on both sides: undefined, never 0
    assert both.nonfinite_both == 1 and math.isnan(both.rel_l2) and not both.finite
    assert not tp.get_metric("rel_l2").passes(both.rel_l2, 1.0)
    inf = torch.tensor([1.0, float("inf")])
    assert math.isnan(tp.measure(inf, inf.clone()).rel_l2)
    assert math.isinf(tp.measure(inf, torch.tensor([1.0, -float("inf")])).rel_l2)  # opposite infinities differ


def test_nan_reference_is_its_own_verdict(tmp_path) -> None:
    model = nan_mlp()
    x = torch.randn(4, 8)
    before = snapshot(model)
    rep = tp.report(model, x, targets=("eager:fp16",))
    assert_unchanged(model, before)
    assert not bool(rep) and not rep.reference_finite and rep.exit_code == 1
    assert all(o.failure and "reference is not finite" in o.failure and not o.passed for o in rep.outcomes)
    first = rep.culprits[0]
    assert (first.module, first.target, first.reason) == ("b", "fp32", Reason.NAN)
    assert "weight holds 1 NaN" in first.evidence
    text = str(rep)
    assert "reference is not finite" in text and "No culprit" not in text and " OK " not in text
    again = tp.Report.from_json(rep.to_json(tmp_path / "r.json"))
    assert not again.reference_finite and again.culprits[0].reason == Reason.NAN

    fix = tp.bisect(model, x, target="eager:fp16")
    assert not fix and not fix.verified and fix.outcome == FixOutcome.REFERENCE_NOT_FINITE
    assert "VERIFIED" not in str(fix) and "refused" in str(fix)
    with pytest.raises(NonFiniteReference, match="reference output holds .* NaN"):
        tp.isolate(model, x, target="eager:fp16")
    assert_unchanged(model, before)


def test_nan_model_exits_1_on_the_cli(tmp_path) -> None:
    (tmp_path / "nan_factory.py").write_text(textwrap.dedent("""
        import torch, sys
        sys.path.insert(0, %r)
        from test_trust import nan_mlp
        def build():
            return nan_mlp(), torch.randn(4, 8)
    """ % str(__import__("pathlib").Path(__file__).parent)))
    proc = run_cli("report", "nan_factory:build", "-t", "eager:fp16", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "not finite" in proc.stdout and "b [Linear] under fp32: nan" in proc.stdout


def test_nan_input_is_named_as_the_origin() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    x[0, 0] = float("nan")
    rep = tp.report(model, x, targets=("eager:fp16",))
    assert not rep and rep.culprits[0].module == "(root)" and "inputs given to the model hold 1 NaN" in rep.culprits[0].evidence


# ----------------------------------------------------------------------------- 2. replay state
def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 128, (2, 12))
    return model, {"input_ids": ids}


def _figures(rep, target: str) -> list:
    return [(e.key, e.kind, None if e.metrics is None else e.metrics.rel_l2, e.failure)
            for e in rep.errors if e.target == target]


def test_gpt2_with_its_cache_has_no_invented_culprits_and_no_order_dependence() -> None:
    model, inputs = gpt2()
    assert model.config.use_cache
    before = snapshot(model)
    targets = ("eager:fp16", "eager:bf16")
    reports = {order: tp.report(model, inputs, targets=order) for order in itertools.permutations(targets)}
    alone = {t: tp.report(model, inputs, targets=(t,)) for t in targets}
    assert_unchanged(model, before)
    for rep in reports.values():
        assert rep and not rep.culprits and not rep.replay_failures, str(rep)
        assert not any(e.failure for e in rep.errors)
    for t in targets:
        expected = _figures(alone[t], t)
        assert expected and all(_figures(rep, t) == expected for rep in reports.values())
    fix = tp.bisect(model, inputs, target="eager:fp16")
    final = alone["eager:fp16"].outcome("eager:fp16").output_error.rel_l2
    assert fix.error_before == final  # bit-identical to the report's figure


class CacheLayer(nn.Module):
    """Appends its keys to a hand-written cache dict and attends over everything cached so far."""

    def __init__(self, i: int):
        super().__init__()
        self.i = i
        self.proj = nn.Linear(16, 16)

    def forward(self, x, cache: dict):
        k = self.proj(x)
        cache.setdefault("keys", []).append(k)
        cache["calls"] = cache.get("calls", 0) + 1
        keys = torch.cat(cache["keys"], dim=1)
        if keys.shape[1] != x.shape[1] * cache["calls"]:
            raise RuntimeError("cache was shared between replays")
        weights = torch.softmax(x @ keys.transpose(1, 2), dim=-1)
        return x + weights @ keys


class CacheModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(CacheLayer(i) for i in range(3))

    def forward(self, x):
        cache: dict = {}
        for layer in self.layers:
            x = layer(x, cache)
        return x


def test_hand_written_cache_dict_is_copied_per_replay() -> None:
    torch.manual_seed(0)
    model = CacheModel().eval()
    x = torch.randn(2, 5, 16) * 0.3
    targets = ("eager:fp16", "eager:bf16", "autocast:bf16")
    first = None
    for order in itertools.permutations(targets):
        rep = tp.report(model, x, targets=order)
        assert not rep.replay_failures and not any(e.failure for e in rep.errors), str(rep)
        figures = {t: _figures(rep, t) for t in targets}
        first = first or figures
        assert figures == first


# ----------------------------------------------------------------------------- 3. no tensor output
class ReturnsNothing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.lin(x)
        return None


class ReturnsInts(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).argmax(-1)


@pytest.mark.parametrize("model", [ReturnsNothing(), ReturnsInts()], ids=["none", "ints"])
def test_no_floating_output_is_a_clear_error(model) -> None:
    with pytest.raises(TorchprobeError, match="returned no floating tensor; torchprobe compares floating outputs"):
        tp.report(model, torch.randn(2, 4), targets=("eager:fp16",))


# ----------------------------------------------------------------------------- 4. bad devices and tol
def test_meta_device_is_named() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(TorchprobeError, match="inputs are on the 'meta' device"):
        tp.report(model, torch.randn(2, 4, device="meta"), targets=("eager:fp16",))
    with pytest.raises(TorchprobeError, match="model are on the 'meta' device"):
        tp.report(nn.Linear(4, 4, device="meta"), torch.randn(2, 4), targets=("eager:fp16",))
    with pytest.raises(TorchprobeError, match="meta"):
        tp.bisect(nn.Linear(4, 4, device="meta"), torch.randn(2, 4), target="eager:fp16")


@pytest.mark.parametrize("tol, words", [
    (0.0, "positive finite"), (-1e-3, "positive finite"), (float("nan"), "positive finite"),
    ({"strict:fp16": 1e-2}, "not among targets=; valid keys: eager:fp16"), ({"eager:fp16": 0}, "positive finite"),
])
def test_bad_tol_is_refused(tol, words) -> None:
    with pytest.raises(InvalidArgument, match=words):
        tp.report(nn.Linear(4, 4), torch.randn(2, 4), targets=("eager:fp16",), tol=tol)


def test_bad_tol_is_refused_by_isolate_and_bisect() -> None:
    for fn in (tp.isolate, tp.bisect):
        with pytest.raises(InvalidArgument, match="positive finite"):
            fn(nn.Linear(4, 4), torch.randn(2, 4), target="eager:fp16", tol=0)


# ----------------------------------------------------------------------------- 6. one direction per metric
class Rounding(nn.Module):
    """(x + 1e4) - 1e4: in FP16 every |x| < 4 rounds to a multiple of 8, so the output is mostly 0."""

    def forward(self, x):
        return (x + 1e4) - 1e4


class RoundingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.round = Rounding()

    def forward(self, x):
        return self.round(self.pre(x))


def test_cosine_tol_means_the_same_everywhere(tmp_path) -> None:
    torch.manual_seed(0)
    model = RoundingNet()
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x)
        low = model.half()(x.half()).float()
    model.float()
    cosine = tp.measure(ref, low).cosine
    assert cosine < 0.9  # far from 1: every component must call it a failure at tol=0.01
    metric = tp.get_metric("cosine")
    assert not metric.passes(cosine, 0.01) and metric.passes(0.995, 0.01) and metric.rule(0.01) == "cosine >= 0.99"

    # compare
    tp.save_dump(tmp_path / "a.safetensors", {"(root)": ref}, target="fp32")
    tp.save_dump(tmp_path / "b.safetensors", {"(root)": low}, target="eager:fp16")
    cmp = tp.compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors", metric="cosine", tol=0.01)
    assert not cmp and cmp.exit_code == 1
    # report, and its HTML page
    rep = tp.report(model, x, targets=("eager:fp16",), metric="cosine", tol=0.01)
    assert not rep and rep.culprits[0].module == "round"
    assert rep.outcome("eager:fp16").output_error.cosine == pytest.approx(cosine, rel=1e-6)
    html = rep.to_html(tmp_path / "r.html").read_text()
    assert "class=bad" in html
    # isolate and bisect
    iso = tp.isolate(model, x, target="eager:fp16", metric="cosine", tol=0.01)
    assert [r.module for r in iso.culprits] == ["round"]
    fix = tp.bisect(model, x, target="eager:fp16", metric="cosine", tol=0.01)
    assert fix and fix.keep_fp32 == ("round",) and not metric.passes(fix.error_before, 0.01)
    # and a loose cosine tol passes in all of them alike
    assert tp.compare(tmp_path / "a.safetensors", tmp_path / "b.safetensors", metric="cosine", tol=1.0)
    assert tp.report(model, x, targets=("eager:fp16",), metric="cosine", tol=1.0)


# ----------------------------------------------------------------------------- 8. small things
def test_not_found_fix_does_not_claim_a_bound_and_rule_names_modules() -> None:
    from models import GrownNorm

    torch.manual_seed(0)
    model = GrownNorm()
    x = torch.randn(4, 16)
    fix = tp.bisect(model, x, target="eager:fp16", tol=1e-9)
    text = str(fix)
    assert not fix and "NOT FOUND" in text and "bound" not in text.splitlines()[3]
    assert "1 candidates" not in text and "result" in text.splitlines()[5]
    rule = next(line for line in text.splitlines() if "rule-based autocast" in line)
    assert "inp" in rule or "norm" in rule


def test_the_callers_hooks_never_fire_on_replays(tmp_path) -> None:
    torch.manual_seed(0)
    model = RoundingNet()
    calls = []
    model.pre.register_forward_hook(lambda m, a, out: calls.append("pre"))
    model.register_forward_pre_hook(lambda m, a: calls.append("root"))
    x = torch.randn(8, 16)
    before = snapshot(model)
    tp.report(model, x, targets=("eager:fp16",))
    tp.isolate(model, x, target="eager:fp16")
    tp.bisect(model, x, target="eager:fp16")
    tp.dump(model, x, tmp_path / "d.safetensors")
    assert calls == []
    assert_unchanged(model, before)
    with torch.no_grad():
        model(x)  # the caller's own run: the hooks fire here, and only here
    assert calls == ["root", "pre"]


def test_hooks_that_compute_weights_are_kept_on_copies() -> None:
    from torchprobe.targets.plan import drop_observer_hooks

    lin = nn.Linear(4, 4)
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(lin)  # legacy weight norm: a pre-hook that rebuilds the weight
    lin.register_forward_pre_hook(lambda m, a: None)
    drop_observer_hooks(lin)
    assert [type(h).__name__ for h in lin._forward_pre_hooks.values()] == ["WeightNorm"]


def test_an_empty_comparison_is_not_a_pass() -> None:
    from torchprobe.io.dumps import Dump

    empty = Dump.from_tensors({})
    cmp = tp.compare(empty, empty)
    assert not cmp and cmp.exit_code == 1 and "no tensors in common" in cmp.verdict()
