import dataclasses

import pytest
import torch
from torch import nn

import torchprobe as tp
from torchprobe.stats import Summarizer
from conftest import assert_unchanged, snapshot


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: tuple
    step: int = 0


class DictAndDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x, mask=None):
        h = self.a(x)
        return {"out": Out(self.b(h), (h, None)), "ids": torch.arange(3), "n": 3}


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.alias = self.block  # the same module under a second name

    def forward(self, x):
        return self.block(self.block(x) * 2)


def test_cnn_rows_in_return_order_match_forward_values():
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    with tp.record(model, capture=True) as rec:
        y = model(x)
    assert [r.key for r in rec.rows] == ["conv", "bn", "act", "pool", "fc", "(root)"]
    conv_out = model.conv(x)
    assert rec["conv"].absmax == pytest.approx(float(conv_out.abs().max()))
    assert rec["conv"].min < 0  # recorded before the in-place ReLU changed the tensor
    assert rec["act"].min == 0.0
    assert torch.equal(rec.tensors["conv"], conv_out)
    assert torch.equal(rec.tensors["(root)"], y)
    assert rec["fc"].module_type == "Linear" and rec["fc"].shape == (2, 4)


def test_inplace_relu_does_not_change_recorded_output():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True))
    x = torch.randn(16, 8)
    expected = model[0](x)
    with tp.record(model, capture=True) as rec:
        model(x)
    assert rec["0"].min == pytest.approx(float(expected.min())) and rec["0"].min < 0
    assert torch.equal(rec.tensors["0"], expected)
    assert rec["1"].min == 0.0


def test_dict_dataclass_and_integer_leaves():
    model = DictAndDataclass()
    with tp.record(model) as rec:
        model(torch.randn(3, 4), mask=None)
    keys = [r.key for r in rec.rows]
    assert keys == ["a", "b", "(root):out.logits", "(root):out.hidden.0", "(root):ids"]
    assert rec["(root):ids"].absmax is None and rec["(root):ids"].numel == 3
    assert rec["(root):out.hidden.0"].absmax == rec["a"].absmax


def test_shared_module_gets_one_row_per_call():
    model = Shared()
    x = torch.randn(2, 4)
    with tp.record(model) as rec:
        model(x)
    assert [r.key for r in rec.rows] == ["block", "block#1", "(root)"]
    first = model.block(x)
    assert rec["block"].absmax == pytest.approx(float(first.abs().max()))
    assert rec["block#1"].absmax == pytest.approx(float(model.block(first * 2).abs().max()))
    assert rec.unvisited() == []


def test_hooks_removed_and_model_unchanged_even_when_forward_raises():
    model = SmallCNN().train()
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        with tp.record(model) as rec:
            model(torch.randn(2, 5, 8, 8))  # wrong channel count
    assert_unchanged(model, before)
    assert [r.key for r in rec.rows] == []  # nothing returned before the failure


def test_training_mode_with_autograd_keeps_no_graph_alive():
    model = SmallCNN().train()
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    with tp.record(model, capture=True) as rec:
        y = model(x)
    y.sum().backward()  # the graph is intact for the user
    held = [p.vector for p in rec._pending if isinstance(p.vector, torch.Tensor)] + list(rec.tensors.values())
    assert held and not any(t.requires_grad or t.grad_fn is not None for t in held)
    assert all(p.vector is not None for p in rec._pending)
    assert len(rec.rows) == 6 and rec["fc"].is_floating


def test_include_exclude_filters():
    model = SmallCNN()
    with tp.record(model, include=["conv", "b*"], exclude="bn") as rec:
        model(torch.randn(1, 3, 8, 8))
    assert [r.key for r in rec.rows] == ["conv"]


def test_unvisited_modules():
    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    with tp.record(model) as rec:
        model["used"](torch.randn(1, 2))
    assert rec.unvisited() == ["unused"]  # the ModuleDict itself is a container, never called


def test_autocast_records_low_precision_outputs():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with tp.record(model) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8))
    assert rec["0"].dtype == "bfloat16"
    assert rec["0"].subnormal_bf16 is None


def test_transformer_block_from_transformers_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    before = snapshot(model)
    with tp.record(model) as rec:
        out = model(input_ids=ids)
    assert_unchanged(model, before)
    keys = [r.key for r in rec.rows]
    assert "encoder.layer.0.attention.output.LayerNorm" in keys
    assert "(root):last_hidden_state" in keys
    ln = rec["encoder.layer.0.output.LayerNorm"]
    assert ln.absmax == pytest.approx(float(out.last_hidden_state.abs().max()))


def test_str_shows_table_and_risks():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight.mul_(1e6)
    with tp.record(model) as rec:
        model(torch.randn(2, 4))
    text = str(rec)
    assert "module call" in text and "At risk in FP16" in text and "1: overflow" in text
    assert {r.kind for r in rec.at_risk()} >= {"overflow"}


def test_capture_save_roundtrip_and_requires_capture(tmp_path):
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    with tp.record(model) as rec:
        model(x)
    with pytest.raises(tp.InvalidArgument, match="capture=True"):
        rec.save(tmp_path / "a.safetensors")
    with tp.record(model, capture=True, offload=True) as rec:
        model(x)
    path = rec.save(tmp_path / "a.safetensors")
    dump = tp.load_dump(path)
    assert list(dump.order) == [r.key for r in rec.rows]
    assert torch.equal(dump["fc"], rec.tensors["fc"])


def test_dump_one_call_form(tmp_path):
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    before = snapshot(model)
    a = tp.dump(model, x, tmp_path / "fp32.safetensors")
    b = tp.dump(model, x, tmp_path / "fp16.safetensors", target="eager:fp16")
    assert_unchanged(model, before)
    cmp = tp.compare(a, b)
    assert cmp and cmp.exit_code == 0
    assert tp.load_dump(b).target == "eager:fp16"


def test_fused_summary_agrees_with_eager():
    x = torch.randn(3000) * 100
    x[0] = float("inf")
    eager = Summarizer(fused=False)(x)
    fused = Summarizer(fused=True)(x)
    assert torch.allclose(eager, fused, rtol=1e-5)
