"""Latent findings: modules broken inside a target whose final output is still within tolerance."""
import pytest
import torch

import torchprobe as tp
from torchprobe.kinds import Reason

transformers = pytest.importorskip("transformers")

ONNX_PATH = "strict-onnx:fp16"  # the target that decomposes layer_norm into FP16 primitives
LN = "convnext.encoder.stages.1.layers.0.layernorm"
BLOCK = "convnext.encoder.stages.1.layers.0"


def convnext_with_grown_norm_input(layer_scale: float = 1e-6):
    """Random-init transformers ConvNeXt; the depthwise conv before one LayerNorm scaled so the
    norm sees |x| ~ 3000 (function-preserving: the LayerNorm is scale-invariant)."""
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                      layer_scale_init_value=layer_scale, image_size=32, num_labels=4)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    with torch.no_grad():
        dw = model.convnext.encoder.stages[1].layers[0].dwconv
        dw.weight.mul_(60000.0)
        dw.bias.mul_(60000.0)
    return model, torch.randn(2, 3, 32, 32)


def test_masked_layernorm_overflow_is_latent_and_explained(tmp_path) -> None:
    model, x = convnext_with_grown_norm_input()
    seen = {}
    handle = model.get_submodule(LN).register_forward_pre_hook(lambda m, a: seen.update(absmax=a[0].abs().max()))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen["absmax"] > 2000  # the injected growth reached the norm
    rep = tp.report(model, x, targets=(ONNX_PATH, "eager:fp16"))
    assert bool(rep) and rep.exit_code == 0 and not rep.culprits
    latent = {c.module: c for c in rep.latent_for(ONNX_PATH)}
    ln = latent[LN]
    assert ln.reason == Reason.OVERFLOW and ln.local_error > 0.5 and ln.masked_by == BLOCK
    assert rep.latent[0].module == LN  # the most severe first
    # layer scale 1e-6: the residual branch's values flush to zero in FP16 -- latent underflow
    drop = latent[f"{BLOCK}.drop_path"]
    assert drop.reason == Reason.UNDERFLOW and "flush to zero" in drop.evidence
    assert LN not in {c.module for c in rep.latent_for("eager:fp16")}  # PyTorch's FP16 layer_norm is fine
    text = str(rep)
    assert "within tolerance, but broken inside" in text and f"masked by {BLOCK}" in text
    assert tp.Report.from_json(rep.to_json(tmp_path / "r.json")).latent == rep.latent
    # latent findings never change the verdict: the CLI-facing summary still says OK
    from torchprobe.render.text import summary_lines

    assert summary_lines(rep)[0].startswith(f"{ONNX_PATH}: OK") and "latent" in summary_lines(rep)[0]


def test_the_same_norm_is_a_culprit_once_it_reaches_the_output() -> None:
    model, x = convnext_with_grown_norm_input(layer_scale=1.0)
    rep = tp.report(model, x, targets=(ONNX_PATH,))
    assert not rep and rep.culprits[0].module == LN and rep.culprits[0].reason == Reason.OVERFLOW


def test_report_with_margins_adds_a_column_json_and_the_html_line(tmp_path) -> None:
    from models import GrownNorm

    torch.manual_seed(0)
    model = GrownNorm(scale=20.0)  # the LayerNorm's input reaches ~45: fine today, breaks at ~x5 under the ONNX path
    x = torch.randn(4, 16)
    rep = tp.report(model, x, targets=(ONNX_PATH,), margins=True)
    factors = rep.margins[ONNX_PATH]
    assert set(factors) >= {"inp", "norm", "out"}
    independent = torch.sqrt(torch.tensor(65504.0)) / (model.inp(x) - model.inp(x).mean(-1, keepdim=True)).abs().max()
    assert factors["norm"] == pytest.approx(float(independent), rel=0.1)
    assert min(factors, key=factors.get) == "norm"
    from torchprobe.render.text import num

    norm_row = next(line for line in str(rep).splitlines() if line.startswith("norm "))
    assert norm_row.split()[-1] == f"x{num(factors['norm'])}" and "margin" in str(rep)
    again = tp.Report.from_json(rep.to_json(tmp_path / "r.json"))
    assert again.margins == rep.margins
    html = rep.to_html(tmp_path / "r.html").read_text()
    assert "margin" in html
