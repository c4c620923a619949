"""check_weights(): every input form, checked against an independent numpy float64 computation."""
from __future__ import annotations

import copy
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from torchprobe.errors import DumpError, InvalidArgument
from torchprobe.weights import WeightReport, check_weights

BIG = "head.proj.weight"
TINY = "stem.conv.weight"
MASK = "blocks.0.mask"


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        # a float32-min attention mask: not saved, but it becomes -inf in FP16
        self.register_buffer("mask", torch.full((4, 4), torch.finfo(torch.float32).min).triu(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask[: x.shape[1], : x.shape[1]])[0]
        return x + self.mlp(x)


class Detector(nn.Module):
    """A small CNN stem + transformer block + head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.ModuleDict({"conv": nn.Conv2d(3, dim, 3, padding=1), "bn": nn.BatchNorm2d(dim)})
        self.blocks = nn.ModuleList([Block(dim)])
        self.head = nn.ModuleDict({"proj": nn.Linear(dim, 4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem["bn"](self.stem["conv"](x)).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head["proj"](x)


def make_model() -> Detector:
    torch.manual_seed(0)
    model = Detector().eval()
    with torch.no_grad():
        model.head["proj"].weight[0, :3] = torch.tensor([7.0e4, -9.1e4, 65519.0])  # 65519 rounds to 65504
        w = model.stem["conv"].weight
        w.mul_(1e-8)  # |w| < 2**-25 mostly: flushes in FP16, not in BF16
        w.view(-1)[:5] = torch.tensor([1e-41, -3e-41, 2e-40, 2.0**-24, 0.0])  # first two flush in BF16
    return model


# --- the independent reference: numpy, float64 ---------------------------------------------------


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float64 by round-to-nearest-even on the bits (finite inputs)."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def reference(t: torch.Tensor) -> dict:
    a = t.detach().float().numpy()  # exact for fp16/bf16/fp32 sources
    v = a.astype(np.float64)
    finite = np.isfinite(v)
    nonzero = finite & (v != 0)
    out = {
        "numel": v.size,
        "absmax": float(np.abs(v[finite]).max(initial=0.0)),
        "beyond_fp16": int((np.abs(v[finite]) > 65504).sum()),
        "nonfinite": int((~finite).sum()),
    }
    with np.errstate(over="ignore", invalid="ignore"):
        casts = {"fp16": a.astype(np.float16).astype(np.float64), "bf16": to_bf16(np.where(finite, a, 0))}
    for fmt, c in casts.items():
        err = np.abs(c[finite] - v[finite])
        with np.errstate(invalid="ignore"):
            rel = np.abs(c[nonzero] - v[nonzero]) / np.abs(v[nonzero])
        out[f"{fmt}_abs_err"] = float(err.max(initial=0.0))
        out[f"{fmt}_rel_err"] = float(rel.max(initial=0.0))
        out[f"{fmt}_flushed"] = int((c[nonzero] == 0).sum())
    return out


def assert_matches_reference(report: WeightReport, state: dict) -> None:
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    assert {r.name for r in report.rows} == set(floating)
    for name, tensor in floating.items():
        row, ref = report[name], reference(tensor)
        assert row.shape == tuple(tensor.shape) and row.dtype == str(tensor.dtype).removeprefix("torch.")
        for field, expected in ref.items():
            assert getattr(row, field) == pytest.approx(expected, rel=1e-12, abs=0), (name, field)


# --- input forms ----------------------------------------------------------------------------------


def test_module_matches_reference_and_flags_risks():
    model = make_model()
    report = check_weights(model)
    state = {**model.state_dict(), MASK: model.blocks[0].mask}
    assert_matches_reference(report, state)

    big, tiny, mask = report[BIG], report[TINY], report[MASK]
    assert big.beyond_fp16 == 3 and big.absmax == pytest.approx(9.1e4)
    assert big.fp16_abs_err == float("inf") and big.bf16_abs_err < 512  # BF16 holds it, coarsely
    assert big.risks == ("overflow",)
    assert tiny.fp16_flushed > 0.8 * tiny.numel and tiny.fp16_rel_err == 1.0
    assert tiny.bf16_flushed == 2 and tiny.risks == ("flush",)
    assert mask.beyond_fp16 == 6 and mask.risks == ("overflow",)  # only visible from the module
    assert {r.name for r in report.overflowing} == {BIG, MASK}
    assert {r.name for r in report.at_risk} == {BIG, MASK, TINY}
    assert not report
    assert report.skipped == ("stem.bn.num_batches_tracked",)
    assert [r.name for r in report.ranked()[:3]] == [MASK, BIG, TINY]


def test_state_dict_pt_safetensors_and_nested_forms_agree(tmp_path):
    model = make_model()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "model.pt")
    torch.save({"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))

    forms = {
        "state dict": sd,
        "nested": {"model": sd, "step": 10},
        "pt": tmp_path / "model.pt",
        "nested pt": str(tmp_path / "ckpt.pth"),
        "safetensors": tmp_path / "model.safetensors",
        "module under state_dict": {"state_dict": model},
    }
    module_rows = {r.name: r for r in check_weights(model).rows if r.name != MASK}
    for form, obj in forms.items():
        report = check_weights(obj)
        assert_matches_reference(report, dict(sd) if form != "module under state_dict" else {**sd, MASK: model.blocks[0].mask})
        if form != "module under state_dict":
            assert {r.name: r for r in report.rows} == module_rows, form
        assert report.skipped == ("stem.bn.num_batches_tracked",), form
    assert check_weights(tmp_path / "ckpt.pth").source.endswith("ckpt.pth['model']")


def test_include_glob_filters_rows_and_skipped():
    report = check_weights(make_model(), include="stem.*")
    assert {r.name for r in report.rows} == {"stem.conv.weight", "stem.conv.bias", "stem.bn.weight",
                                             "stem.bn.bias", "stem.bn.running_mean", "stem.bn.running_var"}
    assert report.skipped == ("stem.bn.num_batches_tracked",)
    assert [r.name for r in check_weights(make_model(), include=["head.*", "*.mask"]).rows] == [
        "head.proj.weight", "head.proj.bias", MASK]
    with pytest.raises(InvalidArgument, match="matches none"):
        check_weights(make_model(), include="decoder.*")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_checkpoints(tmp_path, dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).to(dtype)
    path = tmp_path / "half.safetensors"
    save_file(model.state_dict(), str(path))
    for obj in (model, path):
        report = check_weights(obj)
        assert_matches_reference(report, model.state_dict())
        same = "fp16" if dtype == torch.float16 else "bf16"
        for row in report.rows:
            assert row.dtype == str(dtype).removeprefix("torch.")
            assert getattr(row, f"{same}_abs_err") == 0 and getattr(row, f"{same}_rel_err") == 0
            assert getattr(row, f"{same}_flushed") == 0
        assert report


def test_module_is_not_modified():
    model = make_model().train()
    before = copy.deepcopy(model.state_dict())
    pointers = [p.data_ptr() for p in model.parameters()]
    check_weights(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert model.training and [p.data_ptr() for p in model.parameters()] == pointers
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_and_healthy():
    torch.manual_seed(2)
    healthy = nn.Linear(4, 4)
    report = check_weights(healthy)
    assert report and not report.at_risk and report.skipped == ()
    assert "All 2 floating tensors fit FP16" in str(report)

    w = torch.randn(10)
    w[3], w[7] = float("nan"), float("-inf")
    report = check_weights({"w": w, "step": torch.tensor(5), "note": "x"})
    row = report["w"]
    assert row.nonfinite == 2 and row.risks == ("nonfinite",) and not report
    assert row.absmax == pytest.approx(float(w[torch.isfinite(w)].abs().max()))
    assert row.fp16_abs_err == pytest.approx(reference(w)["fp16_abs_err"], rel=1e-12)
    assert report.skipped == ("step", "note")
    assert "1 of 1 holds NaN/Inf already: w (2 values)" in str(report)


# --- the text and JSON views ----------------------------------------------------------------------


def test_str_verdict_and_to_dict():
    report = check_weights(make_model())
    text = str(report)
    verdict = text.split("\n\n")[0]
    assert verdict.startswith("Detector: 2 of 19 floating tensors exceed FP16 range (|x| > 65504): ")
    assert f"{MASK} (absmax 3.4e+38, 6 values), {BIG} (absmax 9.1e+04, 3 values)." in verdict
    assert f"{TINY} (" in verdict and "stem.bn.num_batches_tracked" in verdict
    lines = text.splitlines()
    assert lines[2].split()[:2] == ["name", "dtype"] and lines[4].split()[0] == MASK

    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["overflowing"] == [BIG, MASK]
    assert data["skipped"] == ["stem.bn.num_batches_tracked"]
    row = next(r for r in data["rows"] if r["name"] == BIG)
    assert row["beyond_fp16"] == 3 and row["shape"] == [4, 16] and row["risks"] == ["overflow"]


def test_str_is_trimmed_for_many_tensors():
    torch.manual_seed(3)
    sd = {f"layers.{i}.weight": torch.randn(3) for i in range(55)}
    sd["layers.54.weight"][0] = 1e5
    text = str(check_weights(sd))
    assert "... 15 more tensors (all in report.rows)" in text
    assert text.splitlines()[4].split()[0] == "layers.54.weight"  # the risky one is ranked first
    assert len(text.splitlines()) == 2 + 2 + 40 + 1


# --- errors ---------------------------------------------------------------------------------------


class Arbitrary:
    pass


def test_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(DumpError, match=f"not found: {missing}"):
        check_weights(missing)
    with pytest.raises(DumpError, match="not found"):
        check_weights(tmp_path / "nope.safetensors")

    corrupt_pt = tmp_path / "bad.pt"
    torch.save(make_model().state_dict(), corrupt_pt)
    corrupt_pt.write_bytes(corrupt_pt.read_bytes()[:2000])
    with pytest.raises(DumpError, match="corrupted or truncated") as info:
        check_weights(corrupt_pt)
    assert str(corrupt_pt) in str(info.value) and info.value.__cause__ is not None
    assert "\n" not in str(info.value)

    corrupt_st = tmp_path / "bad.safetensors"
    corrupt_st.write_bytes(b"\xff" * 64)
    with pytest.raises(DumpError, match="corrupted or truncated") as info:
        check_weights(corrupt_st)
    assert str(corrupt_st) in str(info.value) and info.value.__cause__ is not None

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"w": torch.ones(2), "obj": Arbitrary()}, unsafe)
    with pytest.raises(DumpError, match="weights_only=False") as info:
        check_weights(unsafe)
    message = str(info.value)
    assert str(unsafe) in message and "Arbitrary" in message and "\n" not in message
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)

    class Payload:  # a pickle that would run a command on load: refused, and not called corrupted
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload()}, evil)
    with pytest.raises(DumpError) as info:
        check_weights(evil)
    message = str(info.value)
    assert "refused, not corrupted" in message and "would run code" in message and "system" in message
    assert "safetensors.torch.save_file" in message and "corrupted or truncated" not in message

    with pytest.raises(DumpError, match="directory"):
        check_weights(tmp_path)


def test_argument_errors(tmp_path):
    with pytest.raises(InvalidArgument, match="takes an nn.Module"):
        check_weights([torch.ones(2)])
    with pytest.raises(InvalidArgument, match="holds no tensors"):
        check_weights({"weights_here": "no", "epoch": 3})
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(DumpError, match="holds no tensors"):
        check_weights(tmp_path / "meta.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(DumpError, match="holds a list"):
        check_weights(tmp_path / "list.pt")
