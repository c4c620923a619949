import json

import pytest
import torch
from torch import nn

import torchprobe as tp
from conftest import assert_unchanged, snapshot
from models import Amplifier, FailsInHalf, GrownNorm


def test_seed_scenario_strict_finds_the_overflowing_layernorm():
    model = GrownNorm().eval()
    x = torch.randn(8, 16)
    with tp.record(model) as rec:
        model(x)
    assert rec["inp"].absmax > 1000 and rec["norm"].absmax < 10  # FP32 output is normal
    before = snapshot(model)
    rep = tp.report(model, x, targets=("eager:fp16", "autocast:fp16", "strict-onnx:fp16"))
    assert_unchanged(model, before)
    assert rep.outcome("eager:fp16").passed and rep.outcome("autocast:fp16").passed
    assert not rep.outcome("strict-onnx:fp16").passed
    assert rep.outcome("strict-onnx:fp16").output_error.rel_l2 > 0.1
    top = rep.culprits[0]
    assert (top.module, top.target, top.reason) == ("norm", "strict-onnx:fp16", "overflow")
    assert [c.module for c in rep.culprits] == ["norm"]
    text = str(rep)
    assert text.index("DIVERGES") < text.index("module call")  # verdict first
    assert "norm" in text.splitlines()[3] or "culprits: norm" in text


def test_local_error_names_the_early_module_not_the_amplifier():
    model = Amplifier()
    x = torch.randn(16, 32).half().float()  # exactly representable, so casting the input adds no error
    rep = tp.report(model, x, targets=("eager:fp16",), tol=1e-2)
    assert not rep
    offset = rep.error("offset", "eager:fp16", "local").metrics.rel_l2
    cancel_local = rep.error("cancel", "eager:fp16", "local").metrics.rel_l2
    cancel_prop = rep.error("cancel", "eager:fp16", "propagated").metrics.rel_l2
    assert offset > 1e-2 > cancel_local
    assert cancel_prop > 10 * offset  # the amplifier has the largest propagated error ...
    assert [c.module for c in rep.culprits] == ["offset"]  # ... but the culprit is where it starts
    assert rep.culprits[0].reason == "local-error"


@pytest.mark.parametrize("target", ["eager:fp16", "autocast:fp16", "strict:fp16", "eager:bf16", "autocast:bf16", "strict:bf16"])
def test_healthy_transformer_block_has_no_culprit(target):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=200, attn_implementation="sdpa")
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 200, (2, 16))
    rep = tp.report(model, {"input_ids": ids}, targets=(target,))
    assert rep, str(rep)
    assert rep.culprits == ()


def test_healthy_cnn_from_transformers_config_has_no_culprit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    model = transformers.ResNetModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    rep = tp.report(model, x, targets=("eager:fp16", "autocast:bf16", "strict:fp16"))
    assert rep, str(rep)
    assert rep.culprits == ()
    assert {r.module_type for r in rep.rows} >= {"Conv2d", "BatchNorm2d"}


def test_module_failing_under_a_target_is_a_finding():
    model = FailsInHalf()
    rep = tp.report(model, torch.randn(3, 4), targets=("eager:fp16", "eager:bf16"))
    for target in ("eager:fp16", "eager:bf16"):
        outcome = rep.outcome(target)
        assert not outcome.passed and "inv" in outcome.failure
        culprit = rep.culprits_for(target)[0]
        assert (culprit.module, culprit.reason) == ("inv", "error")


def test_bad_arguments_have_clear_errors():
    model = GrownNorm()
    with pytest.raises(tp.InvalidArgument, match="valid targets: .*strict:fp16"):
        tp.report(model, torch.randn(2, 16), targets=("tensorrt:int8",))
    with pytest.raises(tp.InvalidArgument, match="reference"):
        tp.report(model, torch.randn(2, 16), reference="eager:fp16")


def test_model_unchanged_when_the_forward_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        tp.report(model, torch.randn(2, 5), targets=("eager:fp16",))
    assert_unchanged(model, before)


def test_report_of_train_mode_model_keeps_batchnorm_statistics():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    before = snapshot(model)
    rep = tp.report(model, torch.randn(8, 4), targets=("eager:fp16", "autocast:bf16"))
    assert_unchanged(model, before)
    assert rep  # copies run in eval mode: dropout does not make the comparison random


def test_json_roundtrip(tmp_path):
    model = GrownNorm().eval()
    rep = tp.report(model, torch.randn(4, 16), targets=("eager:fp16", "strict:fp16"))
    path = rep.to_json(tmp_path / "r.json")
    assert json.loads(path.read_text())["format"] == "torchprobe-report"
    back = tp.Report.from_json(path)
    assert back == rep
    (tmp_path / "bad.json").write_text("{]")
    with pytest.raises(tp.DumpError, match="bad.json"):
        tp.Report.from_json(tmp_path / "bad.json")


def test_modules_filter_and_kwargs_inputs():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    rep = tp.report(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, targets=("eager:bf16",), modules="*LayerNorm")
    modules = {e.module for e in rep.errors}
    assert modules and all(m.endswith("LayerNorm") or m == "(root)" for m in modules)


# ----------------------------------------------------------------------------- shadows: own code, cost
class Rounds(nn.Module):
    """Its own code rounds in FP16: (x + 64) - 64 (error ~2%); its children are exact."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Identity()
        self.after = nn.Identity()

    def forward(self, x):
        y = self.inner(x)
        return self.after((y + 64.0) - 64.0)  # the rounding feeds a child: measured on the child's input


class Counted(nn.Module):
    """A leaf that counts the calls it gets with half-precision inputs (the shadows and the propagated pass)."""

    calls = 0

    def forward(self, x):
        if x.dtype == torch.float16:
            Counted.calls += 1
        return x * 1.0


def nested(depth: int) -> nn.Module:
    model = Counted()
    for _ in range(depth):
        model = nn.Sequential(model, nn.Identity())
    return model


def test_a_containers_own_arithmetic_is_its_local_error():
    model = nn.Sequential(nn.Linear(32, 32), Rounds(), nn.Linear(32, 4))
    x = torch.randn(8, 32).half().float()
    rep = tp.report(model, x, targets=("eager:fp16",), tol=1e-2)
    assert [c.module for c in rep.culprits] == ["1"]
    own = rep.error("1:->1.after:0.0", "eager:fp16", "local")  # what its code hands to 1.after
    assert own is not None and own.metrics.rel_l2 > 1e-2
    for child in ("1.inner", "1.after"):
        assert rep.error(child, "eager:fp16", "local").metrics.rel_l2 < 1e-3
    # against an independent computation: the rounding in FP16 of the reference's own values
    with torch.no_grad():
        y = model[0](x)
        expected = tp.measure(y, (y.half() + 64.0) - 64.0).rel_l2
    assert own.metrics.rel_l2 == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("depth", [1, 6])
def test_shadows_run_each_module_once_per_target_whatever_the_nesting(depth):
    Counted.calls = 0
    rep = tp.report(nested(depth), torch.randn(4, 8), targets=("eager:fp16",))
    assert rep
    assert Counted.calls == 2  # its shadow and the propagated pass; not one run per enclosing container


class Drift(nn.Module):
    """(x * c) / c: exact in FP32, a rounding of about 2e-4 in FP16 that differs step by step."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x):
        return (x * self.c) / self.c


def test_error_that_adds_up_is_named_by_the_subtree_that_adds_it():
    steps = nn.Sequential(*[nn.Sequential(Drift(1.0 + 0.0371 * (i + 1)), nn.Identity()) for i in range(30)])
    model = nn.Sequential(steps)
    x = torch.randn(64, 16).half().float()
    rep = tp.report(model, x, targets=("eager:fp16",), tol=6e-4)
    assert not rep and rep.outcome("eager:fp16").output_error.rel_l2 > 6e-4
    drifts = [e for e in rep.errors if e.kind == "local" and e.module.endswith(".0") and e.module.count(".") == 2]
    assert len(drifts) == 30 and all(e.metrics.rel_l2 < 6e-4 for e in drifts)  # no step alone is above tol ...
    assert [c.module for c in rep.culprits] == ["0"]  # ... their container is, run whole on its exact inputs
    assert rep.culprits[0].local_error == pytest.approx(rep.outcome("eager:fp16").output_error.rel_l2, rel=1e-6)


class MaskedScores(nn.Module):
    """Masks scores with finfo(dtype).min of its own dtype, as transformers' attention masks do:
    -3.4e38 in the FP32 reference, -65504 under FP16 -- the same meaning, not an error."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(8, 8)
        self.soft = nn.Softmax(-1)

    def forward(self, x, keep):
        bias = (1.0 - keep) * torch.finfo(x.dtype).min
        return self.soft(self.score(x) + bias)


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = MaskedScores()

    def forward(self, x, keep):
        return self.block(x, keep)


def test_values_the_target_dtype_cannot_hold_are_not_compared_as_errors():
    model = Wrapped()
    x = torch.randn(4, 8)
    keep = torch.ones(4, 8)
    keep[:, 5:] = 0
    rep = tp.report(model, (x, keep), targets=("eager:fp16", "eager:bf16"))
    assert rep and not rep.culprits and not rep.latent, str(rep)
    assert not [e for e in rep.errors if "->" in e.key]  # the masked scores handed to soft: not representable, skipped
    assert rep.error("block.soft", "eager:fp16", "local").metrics.rel_l2 < 1e-2


def test_leaves_of_call_arguments_are_named_like_named_leaves():
    from torchprobe.localize.passes import _leaves
    from torchprobe.tree import named_leaves

    t = torch.ones(1)
    args = (t, None, [t, (t, 3)], {"k": t, "n": None}, "text")
    kwargs = {"a": t, "b": [t, {"c": t}], "e": 5}
    assert [p for p, _ in _leaves(args, kwargs)] == [p for p, _ in named_leaves((args, kwargs))]
