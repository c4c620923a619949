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
