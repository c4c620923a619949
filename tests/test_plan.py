"""Keep-FP32 plans: a fixed model is a normal model (deepcopy, pickle, state_dict, export, torchprobe).

Models: the demo detector (``torchprobe.models.detector``, whose ``encoder.layers.1.norm2``
overflows under ``strict-onnx:fp16``) and a one-layer BERT from a transformers config.
"""
import collections
import copy
import doctest
import io

import pytest
import torch
from torch import nn

import torchprobe as tp
from conftest import assert_unchanged, snapshot
from torchprobe.errors import InvalidArgument, TorchprobeError
from torchprobe.models.detector import build_detector
from torchprobe.targets import build
from torchprobe.targets import plan as plan_module
from torchprobe.targets.plan import PrecisionPlan, keep_fp32, kept_fp32, remove_keep_fp32

LAYER = "encoder.layers.1"  # an EncoderLayer: attn, norm1, ffn (Linear, GELU, Linear), norm2
HALF = torch.float16


def detector_fixed(keep=(LAYER,)):
    model, images = build_detector()
    return model, images, PrecisionPlan(HALF, frozenset(keep)).apply(model)


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def watch(model: nn.Module, names) -> tuple[dict, list]:
    """Plain forward hooks recording (input dtype, output dtype) per call of each named module."""
    seen = collections.defaultdict(list)
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: seen[n].append((args[0].dtype, out[0].dtype if isinstance(out, tuple) else out.dtype)))
        for n in names]
    return seen, handles


INSIDE = [f"{LAYER}.ffn.0", f"{LAYER}.norm2"]
OUTSIDE = ["encoder.layers.0.norm2", "encoder.layers.2.ffn.0"]


def test_apply_keeps_the_module_fp32_inside_and_casts_back_at_its_boundary():
    model, images, fixed = detector_fixed()
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched
    for (name, p), original in zip(fixed.get_submodule(LAYER).named_parameters(), model.get_submodule(LAYER).parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, original), name  # its own values, not rounded to FP16
    assert fixed.encoder.layers[0].norm2.weight.dtype == HALF
    seen, handles = watch(fixed, INSIDE + OUTSIDE + [LAYER])
    with torch.no_grad():
        out = fixed(images.half())
    for h in handles:
        h.remove()
    for name in INSIDE:
        assert seen[name] == [(torch.float32, torch.float32)], name
    for name in OUTSIDE:
        assert seen[name] == [(HALF, HALF)], name
    # a forward hook on the kept module sees the inputs it computes with and the output cast back
    assert seen[LAYER] == [(torch.float32, HALF)]
    assert out["boxes"].dtype == HALF
    assert kept_fp32(fixed) == [LAYER] and kept_fp32(model) == []
    # same numbers as the FP32 layer computed by hand between FP16 halves of the model
    with torch.no_grad():
        half = copy.deepcopy(model).half()
        tokens = half.backbone(images.half()).flatten(2).transpose(1, 2) + half.pos
        tokens = half.encoder.layers[0](tokens)
        tokens = model.encoder.layers[1](tokens.float()).half()
        tokens = half.encoder.layers[2](tokens)
        assert torch.equal(half.box_head(tokens) * 100.0, out["boxes"])


def test_deepcopy_runs_its_own_modules_with_identical_outputs():
    _, images, fixed = detector_fixed()
    clone = copy.deepcopy(fixed)
    x = images.half()
    with torch.no_grad():
        assert_same_outputs(fixed(x), clone(x))
    seen_clone, h1 = watch(clone, INSIDE)
    seen_orig, h2 = watch(fixed, INSIDE)
    with torch.no_grad():
        clone(x)
    for h in h1 + h2:
        h.remove()
    assert all(seen_clone[n] == [(torch.float32, torch.float32)] for n in INSIDE)  # the copy's children fire
    assert not seen_orig  # and the original's do not
    hooks = clone.get_submodule(LAYER)._forward_pre_hooks.values()
    orig_hooks = fixed.get_submodule(LAYER)._forward_pre_hooks.values()
    assert {id(h.__self__) for h in hooks}.isdisjoint(id(h.__self__) for h in orig_hooks)
    with torch.no_grad():  # the copy computes with its own weights
        before = fixed(x)
        clone.get_submodule(LAYER).norm2.weight.mul_(2.0)
        assert not torch.equal(clone(x)["boxes"], before["boxes"])
        assert_same_outputs(fixed(x), before)


def test_torch_save_and_load_round_trip():
    _, images, fixed = detector_fixed()
    buffer = io.BytesIO()
    torch.save(fixed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = images.half()
    with torch.no_grad():
        assert_same_outputs(fixed(x), loaded(x))
    assert kept_fp32(loaded) == [LAYER]
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in fixed.state_dict().items()}
    seen, handles = watch(loaded, INSIDE + OUTSIDE)
    with torch.no_grad():
        loaded(x)
    for h in handles:
        h.remove()
    assert all(seen[n] == [(torch.float32, torch.float32)] for n in INSIDE)
    assert all(seen[n] == [(HALF, HALF)] for n in OUTSIDE)


def test_state_dict_round_trip_keeps_names_and_dtypes():
    model, images, fixed = detector_fixed()
    state = fixed.state_dict()
    assert list(state) == list(model.state_dict())  # no wrapper: every name as in the user's model
    assert state[f"{LAYER}.norm2.weight"].dtype == torch.float32 and state["encoder.layers.0.norm2.weight"].dtype == HALF
    other, _ = build_detector(seed=1)  # different weights, same architecture
    fresh = keep_fp32(other, [LAYER], dtype=HALF)
    x = images.half()
    with torch.no_grad():
        assert not torch.equal(fresh(x)["boxes"], fixed(x)["boxes"])
        fresh.load_state_dict(state)
        assert_same_outputs(fresh(x), fixed(x))
        fixed.load_state_dict(model.state_dict())  # FP32 weights load into the plan's dtypes
        assert fixed.get_submodule(LAYER).norm2.weight.dtype == torch.float32
        assert_same_outputs(fresh(x), fixed(x))


def _node_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def test_export_computes_the_kept_module_in_fp32():
    _, images, fixed = detector_fixed(keep=(f"{LAYER}.norm2",))
    x = images.half()
    exported = torch.export.export(fixed, (x,), strict=False)
    nodes = [n for n in exported.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]
    inside = [(n.target, n.meta["val"].dtype) for n in nodes if _node_path(n) == f"{LAYER}.norm2"]
    cast = torch.ops.aten.to.dtype
    assert inside == [(cast, torch.float32), (torch.ops.aten.layer_norm.default, torch.float32), (cast, HALF)]
    norms = {_node_path(n): n.meta["val"].dtype for n in nodes if n.target == torch.ops.aten.layer_norm.default}
    assert norms[f"{LAYER}.norm2"] == torch.float32
    assert {d for p, d in norms.items() if p != f"{LAYER}.norm2"} == {HALF}
    with torch.no_grad():  # the exported graph runs MultiheadAttention's math path, eager its fast path
        assert tp.measure(fixed(x)["boxes"], exported.module()(x)["boxes"]).rel_l2 < 1e-3


def test_a_fixed_model_handed_back_to_torchprobe_is_found_healthy():
    model, images = build_detector()
    fix = tp.bisect(model, images, target="strict-onnx:fp16", tol=1e-2)
    assert fix and fix.keep_fp32 == ("encoder.layers.1.norm2",) and fix.error_before > 0.1
    fixed = fix.apply(model)
    state = snapshot(fixed)
    # torchprobe's own copy of the fixed model, cast to the target dtype, keeps the module FP32
    runner = build("strict-onnx:fp16", fixed, (images,), {})
    assert kept_fp32(runner.module) == ["encoder.layers.1.norm2"]
    assert runner.module.encoder.layers[1].norm2.weight.dtype == torch.float32
    planned = build("strict-onnx:fp16", model, (images,), {}, keep_fp32=fix.keep_fp32)
    assert_same_outputs(runner(images), planned(images))  # the fixed model measures as the plan does
    reference = build("fp32", fixed, (images,), {})  # the reference: the fixed model's weights, all in FP32
    assert {p.dtype for p in reference.module.parameters()} == {torch.float32}
    rep = tp.report(fixed, images, targets=("strict-onnx:fp16",))
    assert rep and not rep.culprits, str(rep)
    again = tp.bisect(fixed, images, target="strict-onnx:fp16", tol=1e-2)
    assert again and again.keep_fp32 == () and again.error_before <= 1e-2
    assert_unchanged(fixed, state)


def test_autocast_region_is_off_inside_and_closed_when_forward_raises():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.fail = False

        def forward(self, x):
            y = self.lin(x)
            if self.fail:
                raise RuntimeError("boom")
            return y

    model = nn.Sequential(nn.Linear(8, 8), Flaky(), nn.Linear(8, 8)).eval()
    fixed = PrecisionPlan(torch.bfloat16, frozenset({"1"})).apply(model, cast_weights=False, autocast_device="cpu")
    clone = copy.deepcopy(fixed)
    x = torch.randn(4, 8)
    for m in (fixed, clone):
        seen, handles = watch(m, ["0", "1.lin", "2"])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        for h in handles:
            h.remove()
        assert seen == {"0": [(torch.float32, torch.bfloat16)], "1.lin": [(torch.float32, torch.float32)],
                        "2": [(torch.float32, torch.bfloat16)]}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fixed(x), clone(x))
        fixed[1].fail = True
        with pytest.raises(RuntimeError, match="boom"):
            fixed(x)
        assert torch.is_autocast_enabled("cpu")  # the disabled region was closed on the way out
        assert fixed[2](x).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert not any(h.__self__._open for h in fixed[1]._forward_pre_hooks.values())


def test_nested_names_collapse_and_unknown_names_are_refused():
    model, images = build_detector()
    nested = PrecisionPlan(HALF, frozenset({LAYER, f"{LAYER}.norm2", f"{LAYER}.ffn.0"}))
    assert nested.outermost() == [LAYER]
    a, b = nested.apply(model), PrecisionPlan(HALF, frozenset({LAYER})).apply(model)
    assert kept_fp32(a) == [LAYER]
    with torch.no_grad():
        assert_same_outputs(a(images.half()), b(images.half()))
    # keep_fp32 on an already fixed model: the union, collapsed to the outermost
    keep_fp32(a, ["encoder.layers", "encoder.layers.0.norm2"], dtype=HALF)
    assert kept_fp32(a) == ["encoder.layers"]
    with pytest.raises(InvalidArgument, match=r"keep_fp32 names module 'encoder.layer.1', which the model does not have; "
                                              r"did you mean encoder.layers.1"):
        PrecisionPlan(HALF, frozenset({"encoder.layer.1"})).apply(model)
    with pytest.raises(InvalidArgument, match="names= takes a list"):
        keep_fp32(model, "encoder")
    with pytest.raises(InvalidArgument, match="dtype= must be a floating"):
        keep_fp32(model, [LAYER], dtype=torch.int8)


def test_keep_fp32_in_place_matches_apply_and_names_a_later_cast():
    model, images, planned = detector_fixed()
    mine = copy.deepcopy(model)
    assert keep_fp32(mine, [LAYER], dtype=HALF) is mine
    x = images.half()
    with torch.no_grad():
        assert_same_outputs(mine(x), planned(x))
        # a module inside the kept one, called on its own (torchprobe's replays), also runs FP32
        inner = mine.get_submodule(f"{LAYER}.norm2")(torch.randn(2, 64).half())
        assert inner.dtype == torch.float32
        mine.half()  # casting after keep_fp32 undoes the FP32 weights: the forward says so
        with pytest.raises(TorchprobeError, match=r"'encoder.layers.1.attn' is kept in FP32 but its parameter "
                                                  r"'in_proj_weight' is fp16"):
            mine(x)
        keep_fp32(mine, kept_fp32(mine), dtype=HALF)  # FP32 compute again, on weights rounded to FP16
        assert mine.get_submodule(f"{LAYER}.norm2").weight.dtype == torch.float32
        assert 0 < tp.measure(planned(x)["boxes"], mine(x)["boxes"]).rel_l2 < 1e-2
    remove_keep_fp32(mine)
    assert kept_fp32(mine) == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in mine.modules())


def test_root_kept_returns_fp32():
    model, images = build_detector()
    fixed = PrecisionPlan(HALF, frozenset({"(root)"})).apply(model)
    with torch.no_grad():
        x = images.half()
        assert_same_outputs(fixed(x), model(x.float()))  # everything in FP32: the FP32 model itself
    assert kept_fp32(fixed) == ["(root)"]


def test_bert_with_kept_embeddings_and_norm_survives_copies():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    kept = ["embeddings", "encoder.layer.0.output.LayerNorm"]
    fixed = PrecisionPlan(HALF, frozenset(kept)).apply(model)
    buffer = io.BytesIO()
    torch.save(fixed, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(fixed), torch.load(buffer, weights_only=False)):
        seen, handles = watch(other, ["embeddings.LayerNorm", "encoder.layer.0.output.dense"])
        with torch.no_grad():
            a = fixed(input_ids=ids, attention_mask=mask)
            b = other(input_ids=ids, attention_mask=mask)
        for h in handles:
            h.remove()
        assert torch.equal(a.last_hidden_state, b.last_hidden_state) and a.last_hidden_state.dtype == HALF
        assert seen["embeddings.LayerNorm"] == [(torch.float32, torch.float32)]
        assert seen["encoder.layer.0.output.dense"] == [(HALF, HALF)]
        assert sorted(kept_fp32(other)) == sorted(kept)


def test_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the keep_fp32 example saves fixed.pt
    result = doctest.testmod(plan_module)
    assert result.attempted >= 8 and result.failed == 0
    assert (tmp_path / "fixed.pt").stat().st_size > 0
