"""explain(): the ops that reach the engine, their dtypes, rules and risks, on real modules."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch
from torch import nn

import torchprobe as tp
from torchprobe.cli import main
from torchprobe.errors import InvalidArgument

from conftest import assert_unchanged, snapshot

GOLDEN = pathlib.Path(__file__).parent / "golden"


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class PrimitiveNorm(nn.Module):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        return (x - u) / torch.sqrt((x - u).pow(2).mean(-1, keepdim=True) + 1e-5)


class Head(nn.Module):
    """Linear (output ~3000) -> LayerNorm -> Linear -> LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.norm, self.out, self.logp = nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 10), nn.LogSoftmax(-1)
        with torch.no_grad():
            self.proj.weight.mul_(3000 / 0.6)
            self.out.weight.mul_(40)

    def forward(self, x):
        return self.logp(self.out(self.norm(self.proj(x))))


def test_explain_names_each_op_its_dtype_rule_and_risk():
    model, x = Head().eval(), randn(8, 16)
    before = snapshot(model)
    ex = tp.explain(model, x, target="strict:fp16")
    assert_unchanged(model, before)
    half = Head().eval().half()
    half.load_state_dict({k: v.half() for k, v in model.state_dict().items()})
    with torch.no_grad():
        proj = half.proj(x.half()).double()  # the FP16 graph's values, computed in float64
        logits = half.out(half.norm(proj.half())).double()

    norm = ex["norm"].ops[0]
    assert (norm.op, norm.dtype, norm.rule, norm.risk) == ("aten.native_layer_norm.default", "fp16", "layer_norm", None)
    centered = float((proj - proj.mean(-1, keepdim=True)).square().max())
    assert norm.peak == pytest.approx(centered, rel=1e-3) and norm.peak > 65504
    assert "FP32 inside" in norm.note  # safe, and why
    assert ex["proj"].ops[0].absmax == pytest.approx(float(proj.abs().max()), rel=1e-3)

    log = [o for o in ex["logp"].ops if o.op == "aten.log.default"][0]
    p = torch.softmax(logits, -1)
    assert log.rule == "log_softmax" and log.risk.startswith(f"-inf: {int((p < 2**-25).sum())} probabilities")
    assert [o.module for o in ex.risks] == ["logp"]

    onnx = tp.explain(model, x, target="strict-onnx:fp16")
    (risk,) = [o for o in onnx.risks if o.module == "norm"]
    assert risk.rule == "layer_norm" and risk.risk.startswith("(x-mean)^2 reaches")
    assert {o.module for o in onnx.risks} == {"norm", "logp"}


def test_keeping_a_module_in_fp32_shows_in_its_dtypes():
    model, x = nn.Sequential(nn.Linear(16, 32), PrimitiveNorm(), nn.Linear(32, 4)).eval(), randn(4, 16)
    with torch.no_grad():
        model[0].weight.mul_(3000)
    ex = tp.explain(model, x, target="strict:fp16")
    assert [o.op for o in ex.risks] == ["aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.add.Tensor"]
    assert all(o.module == "1" and o.dtype == "fp16" for o in ex.risks)
    kept = tp.explain(model, x, target="strict:fp16", keep_fp32=["1"])
    assert kept.risks == () and {o.dtype for o in kept["1"].ops if o.rule != "cast"} == {"fp32"}
    assert any(o.rule == "cast" and o.module == "1" for o in kept.ops)


def test_explain_rejects_other_targets_and_non_modules():
    with pytest.raises(InvalidArgument, match="strict:fp16, strict:bf16, tensorrt:fp16.*strict-onnx:bf16"):
        tp.explain(nn.Linear(2, 2), randn(1, 2), target="eager:fp16")
    with pytest.raises(InvalidArgument, match="takes an nn.Module"):
        tp.explain(lambda x: x, randn(1, 2))


def test_golden_explain_of_one_minilm_layer():
    """The trained MiniLM's first layer on two real sentences (regenerate: TORCHPROBE_REGEN_GOLDEN=1)."""
    from test_strict import minilm

    model, inputs = minilm()
    with torch.no_grad():
        hidden = model.embeddings(input_ids=inputs["input_ids"])
    text = str(tp.explain(model.encoder.layer[0], (hidden,), target="strict:fp16"))
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    path = GOLDEN / "explain_minilm_layer0.txt"
    if os.environ.get("TORCHPROBE_REGEN_GOLDEN") == "1":
        from torchprobe.io.atomic import write_text

        GOLDEN.mkdir(exist_ok=True)
        write_text(path, text)
    assert text == path.read_text(), "explain output changed; if intended, rerun with TORCHPROBE_REGEN_GOLDEN=1"


def test_cli_explain_exit_status_follows_the_risks(tmp_path, capsys):
    factory = tmp_path / "factory.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64)).eval()\n"
        "    with torch.no_grad():\n        m[0].weight.mul_(5000)\n"
        "    return m, torch.randn(4, 16)\n")
    assert main(["explain", f"{factory}:build"]) == 0  # one normalization layer, FP32 inside
    out = capsys.readouterr().out
    assert "explain strict:fp16: Torch-TensorRT 2.11-2.14 profile" in out and "native_layer_norm" in out
    assert main(["explain", f"{factory}:build", "--target", "strict-onnx:fp16", "-q"]) == 1
    assert "1 aten.layer_norm.default: (x-mean)^2 reaches" in capsys.readouterr().out
    assert main(["explain", f"{factory}:build", "--fp16-norms", "-q"]) == 1
