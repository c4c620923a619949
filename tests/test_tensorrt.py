"""The ``tensorrt`` backend and the fix printed as Torch-TensorRT code.

Tests marked ``needs_tensorrt`` compile with the real torch_tensorrt and skip, with the reason
``TensorRTBackend.unavailable`` gives, where it is missing or CUDA is not available. Everything
else (availability message, signature detection, op census, snippet, regexes) runs everywhere.
"""
from __future__ import annotations

import ast
import collections
import copy
import importlib.util
import io
import json
import pickle
import re
import sys

import pytest
import torch
from torch import fx, nn

from torchprobe.errors import InvalidArgument, UnsupportedTarget
from torchprobe.names import ROOT, is_within
from torchprobe.targets.plan import PrecisionPlan
from torchprobe.targets.tensorrt import (
    NOT_INSTALLED,
    CompileInfo,
    EngineLayer,
    TensorRTBackend,
    TensorRTProgram,
    _census,
    autocast_exclusion_regexes,
    compile_options,
    layers_by_module,
    parse_layer_info,
    tensorrt_snippet,
)

CUDA = torch.device("cuda")
TRT_REASON = TensorRTBackend().unavailable(CUDA)
needs_tensorrt = pytest.mark.skipif(TRT_REASON is not None, reason=f"{TRT_REASON}")
TRT_INSTALLED = importlib.util.find_spec("torch_tensorrt") is not None


# --------------------------------------------------------------------------------------------
# Models


class Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.norm20 = nn.LayerNorm(dim)  # a sibling whose name extends "norm2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ffn(self.norm1(x))
        return self.norm20(self.norm2(x))


class Encoder(nn.Module):
    """32 layers so that ``layers.3`` has siblings ``layers.30`` and ``layers.31``."""

    def __init__(self, dim: int = 8, depth: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim) for _ in range(depth))
        self.heads = nn.ModuleDict({"box+reg": nn.Linear(dim, 4), "box": nn.Linear(dim, 4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.heads["box+reg"](x) + self.heads["box"](x)


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class NormHead(nn.Module):
    """Linear -> LayerNorm -> Linear; the LayerNorm input is large, the classic FP16 overflow."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.proj(x) * 300.0))


KEPT = ["encoder.layers.3.norm2", "encoder.layers.30", "encoder.heads.box+reg"]


# --------------------------------------------------------------------------------------------
# Runs everywhere


def test_backend_declares_its_interface() -> None:
    backend = TensorRTBackend()
    assert backend.name == "tensorrt"
    assert backend.cast_weights and backend.compiles
    assert backend.dtypes == (torch.float32, torch.float16, torch.bfloat16)
    assert backend.last_info is None


@pytest.mark.skipif(TRT_INSTALLED, reason="torch_tensorrt is installed here")
def test_unavailable_says_torch_tensorrt_is_missing() -> None:
    for device in (CUDA, torch.device("cpu"), "cuda:0"):
        reason = TensorRTBackend().unavailable(device)
        assert reason == NOT_INSTALLED
        assert reason.startswith("torch_tensorrt is not installed (needs a CUDA machine with TensorRT)")
        assert 'pip install "torchprobe[tensorrt]"' in reason


def test_unavailable_on_cpu_device() -> None:
    reason = TensorRTBackend().unavailable(torch.device("cpu"))
    assert reason is not None
    assert reason == NOT_INSTALLED or "CUDA devices only" in reason


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is available here")
def test_wrap_raises_unsupported_target_with_the_reason() -> None:
    backend = TensorRTBackend()
    with pytest.raises(UnsupportedTarget) as info:
        backend.wrap(nn.Linear(4, 4), torch.float16, (torch.randn(2, 4),), {}, name="head")
    assert "'tensorrt:fp16'" in str(info.value) and "'head'" in str(info.value)
    assert backend.last_info is None


# Stand-ins for torch_tensorrt.dynamo.compile's signature only (never called): 2.12 has
# use_explicit_typing, 2.13+ does not; both swallow unknown options in **kwargs.
def compile_2_12(exported_program, inputs=None, *, arg_inputs=None, kwarg_inputs=None, device=None,
                 enabled_precisions=None, min_block_size=5, dryrun=False, timing_cache_path="",
                 cache_built_engines=False, reuse_cached_engines=False, use_explicit_typing=True, **kwargs):
    raise AssertionError("signature only")


def compile_2_13(exported_program, inputs=None, *, arg_inputs=None, kwarg_inputs=None, device=None,
                 min_block_size=5, dryrun=False, timing_cache_path="", cache_built_engines=False,
                 reuse_cached_engines=False, enable_autocast=False, **kwargs):
    raise AssertionError("signature only")


def compile_without_timing_cache(exported_program, *, arg_inputs=None, kwarg_inputs=None, device=None,
                                 min_block_size=5, dryrun=False, cache_built_engines=False,
                                 reuse_cached_engines=False, **kwargs):
    raise AssertionError("signature only")


def test_compile_options_pass_use_explicit_typing_only_where_it_exists() -> None:
    old = compile_options(compile_2_12, device=CUDA, timing_cache_path="/tmp/t/timing.bin")
    new = compile_options(compile_2_13, device=CUDA, timing_cache_path="/tmp/t/timing.bin")
    assert old["use_explicit_typing"] is True
    assert "use_explicit_typing" not in new
    for options in (old, new):
        assert "enabled_precisions" not in options
        assert options["min_block_size"] == 1
        assert options["cache_built_engines"] is False and options["reuse_cached_engines"] is False
        assert options["timing_cache_path"] == "/tmp/t/timing.bin"
        assert options["device"] == CUDA and options["dryrun"] is False


def test_compile_options_refuse_a_signature_that_would_swallow_an_option() -> None:
    with pytest.raises(UnsupportedTarget, match="timing_cache_path"):
        compile_options(compile_without_timing_cache, device=CUDA, timing_cache_path="t.bin")


def _partitioned(acc_as_graph: bool) -> fx.GraphModule:
    """The shape of a fast-partitioned graph, built by hand to test the counting alone:
    ``_run_on_acc_0`` (3 ops), ``_run_on_gpu_1`` (2 ops), ``_run_on_acc_2`` (1 op)."""

    class Three(nn.Module):
        def forward(self, x):
            return torch.relu(x * 2 + 1)

    class Two(nn.Module):
        def forward(self, x):
            return torch.sort(torch.sin(x))[0]

    class One(nn.Module):
        def forward(self, x):
            return torch.neg(x)

    children = {
        "_run_on_acc_0": fx.symbolic_trace(Three()) if acc_as_graph else Three(),
        "_run_on_gpu_1": fx.symbolic_trace(Two()),
        "_run_on_acc_2": fx.symbolic_trace(One()) if acc_as_graph else One(),
    }
    graph = fx.Graph()
    value = graph.placeholder("x")
    for name in children:
        value = graph.call_module(name, (value,))
    graph.output(value)
    return fx.GraphModule(children, graph)


def test_census_counts_segments_and_ops() -> None:
    dry = _census(_partitioned(acc_as_graph=True))
    assert dry.trt_segments == ("_run_on_acc_0", "_run_on_acc_2")
    assert dry.torch_segments == ("_run_on_gpu_1",)
    assert dry.trt_ops == 4  # 3 + 1
    assert sum(dry.torch_ops.values()) == 2  # sin, sort; the getitem is glue, not counted
    built = _census(_partitioned(acc_as_graph=False))  # engines are no graphs: unknown op count
    assert built.trt_segments == dry.trt_segments and built.trt_ops is None
    assert built.torch_ops == dry.torch_ops


def test_compile_info_fraction_and_text() -> None:
    info = CompileInfo(
        module="encoder.layers.3", dtype=torch.float16, segments=2, fallback_segments=1, trt_ops=38,
        torch_ops=2, fallback_ops=(("aten.sort.default", 2),), version="2.13.0", build_s=3.25,
    )
    assert info.trt_fraction == pytest.approx(0.95)
    text = str(info)
    for part in ("tensorrt:fp16 encoder.layers.3", "2 TensorRT engines", "1 PyTorch segment,",
                 "38/40 ops in TensorRT (95.0%)", "aten.sort.default x2", "torch_tensorrt 2.13.0"):
        assert part in text
    unknown = CompileInfo(None, torch.bfloat16, 1, 0, None, 0, (), "2.11.0", 1.0)
    assert unknown.trt_fraction is None and str(unknown).startswith("tensorrt:bf16: 1 TensorRT engine, 0 PyTorch segments")


# Engine inspector JSON in the two forms TensorRT documents ("Engine Inspector", TensorRT 10.16
# developer guide): names only (ProfilingVerbosity.LAYER_NAMES_ONLY) and detailed; the layer names
# follow Torch-TensorRT's set_layer_name/get_node_name ([TYPE]-[aten_ops.op]-[module/node]). These
# are format samples written for the parser, not the output of an engine.
NAMES_ONLY = json.dumps({"Layers": [
    "[MATRIX_MULTIPLY]-[aten_ops.linear.default]-[proj/linear_matrix_multiply] + "
    "[ELEMENTWISE]-[aten_ops.linear.default]-[proj/linear_add_bias]",
    "[NORMALIZATION]-[aten_ops.native_layer_norm.default]-[norm/native_layer_norm]",
    "Reformatting CopyNode for Input Tensor 0 to [MATRIX_MULTIPLY]-[aten_ops.linear.default]-[out/linear]",
], "Bindings": ["x", "output0"]})
DETAILED = json.dumps({"Layers": [
    {"Name": "[NORMALIZATION]-[aten_ops.native_layer_norm.default]-[encoder.layers.3.norm2/native_layer_norm]",
     "LayerType": "Normalization",
     "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP16 format"}],
     "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}]},
    {"Name": "[CONVOLUTION]-[aten_ops.convolution.default]-[/features/0/convolution] + "
             "[RELU]-[aten_ops.relu.default]-[/features/1/relu]",
     "LayerType": "CaskConvolution",
     "Outputs": [{"Name": "z", "Format/Datatype": "Channel major FP32 format where channel % 4 == 0"}]},
]})


def test_layer_info_is_parsed_into_layers_per_module() -> None:
    layers = parse_layer_info(NAMES_ONLY)
    assert [layer.types for layer in layers] == [("MATRIX_MULTIPLY", "ELEMENTWISE"), ("NORMALIZATION",), ("MATRIX_MULTIPLY",)]
    assert [layer.modules for layer in layers] == [("proj",), ("norm",), ("out",)]
    assert layers[1].ops == ("native_layer_norm.default",) and layers[1].kind is None and layers[1].precision is None
    detailed = parse_layer_info(DETAILED)
    assert (detailed[0].modules, detailed[0].kind, detailed[0].precision) == (("encoder.layers.3.norm2",), "Normalization", "FP16")
    assert detailed[1].modules == ("features.0", "features.1") and detailed[1].precision == "FP32"  # older "/a/b/node" paths
    assert sorted(layers_by_module(detailed)) == ["encoder.layers.3.norm2", "features.0", "features.1"]
    assert parse_layer_info("not json") == () and parse_layer_info('{"Layers": [3]}') == ()
    info = CompileInfo("head", torch.float16, 1, 0, 4, 0, (), "2.14.0", 1.0, layers=detailed, layer_info="detailed")
    assert str(info).endswith("; layers: encoder.layers.3.norm2 -> NORMALIZATION (FP16); "
                              "features.0 -> CONVOLUTION+RELU (FP32); features.1 -> CONVOLUTION+RELU (FP32)")


def _expected(paths: list[str], kept: list[str]) -> list[str]:
    return [p for p in paths if any(is_within(p, k) for k in kept)]


def test_regexes_match_kept_modules_and_children_only() -> None:
    paths = [name for name, _ in Detector().named_modules()]
    regexes = autocast_exclusion_regexes(KEPT)
    assert regexes[0] == r"^encoder\.layers\.3\.norm2(\.|$)"
    matched = [p for p in paths if any(re.match(r, p) for r in regexes)]
    assert matched == _expected(paths, KEPT)
    assert "encoder.layers.30.ffn.0" in matched  # a child
    for sibling in ("encoder.layers.3.norm20", "encoder.layers.3", "encoder.layers.31", "encoder.layers.3.norm1",
                    "encoder.heads.box", "encoder.layers.13.norm2", ""):
        assert sibling in paths and sibling not in matched
    # layers.3 kept: matches layers.3 and its children, not layers.30..31
    regex = autocast_exclusion_regexes(["encoder.layers.3"])
    assert [p for p in paths if re.match(regex[0], p)] == _expected(paths, ["encoder.layers.3"])


def test_regexes_collapse_nested_names_and_root() -> None:
    assert autocast_exclusion_regexes(["a.b", "a", "a.b.c", "a"]) == [r"^a(\.|$)"]
    assert autocast_exclusion_regexes(["ab", "a"]) == [r"^ab(\.|$)", r"^a(\.|$)"]
    assert autocast_exclusion_regexes([ROOT, "a"]) == [".*"]
    assert autocast_exclusion_regexes([]) == []
    with pytest.raises(InvalidArgument, match="sequence of module names"):
        autocast_exclusion_regexes("encoder.layers.3")


def _innermost_path(node: fx.Node) -> str:
    """The name Torch-TensorRT's excluded-node rule matches: the innermost nn_module_stack path."""
    stack = node.meta["nn_module_stack"]
    return stack[next(reversed(stack))][0]


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's own, from run_decompositions
def test_regexes_select_exactly_the_kept_modules_nodes_in_an_export() -> None:
    model, x = Detector().eval(), torch.randn(2, 8)
    exported = torch.export.export(model, (x,), strict=False).run_decompositions()
    nodes = [n for n in exported.graph.nodes if n.op == "call_function"]
    regexes = autocast_exclusion_regexes(KEPT)
    excluded = {n.name for n in nodes if any(re.match(r, _innermost_path(n)) for r in regexes)}
    expected = {n.name for n in nodes if any(is_within(_innermost_path(n), k) for k in KEPT)}
    assert excluded == expected and len(expected) > 3
    assert not any(_innermost_path(n).startswith("encoder.layers.31") for n in nodes if n.name in excluded)


def test_snippet_is_valid_python_with_both_routes() -> None:
    snippet = tensorrt_snippet(KEPT, torch.float16, ["images"])
    tree = ast.parse(snippet)
    compile(snippet, "<snippet>", "exec")
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"keep_fp32", "compile_keep_fp32", "compile_autocast"} <= functions
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "torch_tensorrt.dynamo.compile"]
    keywords = [{k.arg: k.value for k in call.keywords} for call in calls]
    assert len(keywords) == 2
    for kw in keywords:
        assert ast.literal_eval(kw["min_block_size"]) == 1
        assert "enabled_precisions" not in kw and "use_explicit_typing" not in kw
    autocast = keywords[1]
    assert ast.literal_eval(autocast["enable_autocast"]) is True
    assert ast.unparse(autocast["autocast_low_precision_type"]) == "torch.float16"
    assert sorted(ast.literal_eval(autocast["autocast_excluded_nodes"])) == sorted(autocast_exclusion_regexes(KEPT))
    assert "use_explicit_typing=True" in snippet and "2.13+" in snippet  # the version comment
    assert "trt_model = compile_keep_fp32(model, (images,))" in snippet  # the call, shown as a comment
    # it only defines things: running it needs torch-tensorrt and nothing the reader has not got
    kinds = {type(n) for n in tree.body}
    assert kinds <= {ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign}, kinds
    assert "forward =" not in snippet and "register_forward_pre_hook" in snippet


def test_snippet_variants_stay_valid() -> None:
    weird = ["a.b\"c", "x\\y", "layer(1)", "héad"]
    for keep, dtype, hint in [(weird, torch.bfloat16, ("a", "b")), ([], torch.float16, None), ([ROOT], torch.float16, "x")]:
        snippet = tensorrt_snippet(keep, dtype, hint)
        tree = ast.parse(snippet)
        assigned = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert ast.literal_eval(assigned["KEEP_FP32"]) == ["" if k == ROOT else k for k in keep]
    assert "autocast_low_precision_type=torch.bfloat16" in tensorrt_snippet(["a"], torch.bfloat16)
    assert "autocast_excluded_nodes=set()" in tensorrt_snippet([], torch.float16)
    with pytest.raises(InvalidArgument, match="low-precision dtype"):
        tensorrt_snippet(["a"], torch.float32)
    with pytest.raises(InvalidArgument, match="identifiers"):
        tensorrt_snippet(["a"], torch.float16, ["class"])


def _snippet_helpers(snippet: str, tmp_path) -> dict:
    """Import the snippet's definitions as a module (everything but its import of torch_tensorrt)."""
    tree = ast.parse(snippet)
    keep = [n for n in tree.body if not (isinstance(n, ast.Import) and n.names[0].name == "torch_tensorrt")]
    path = tmp_path / "torchprobe_snippet.py"
    path.write_text(ast.unparse(ast.Module(body=keep, type_ignores=[])))
    spec = importlib.util.spec_from_file_location("torchprobe_snippet", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["torchprobe_snippet"] = module  # importable by name: what pickle needs
    spec.loader.exec_module(module)
    return vars(module)


def test_snippet_keep_fp32_helper_runs_and_matches_the_plan(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = Detector().eval(), torch.randn(2, 8)
    helpers = _snippet_helpers(tensorrt_snippet(KEPT, torch.float16), tmp_path)
    fixed = helpers["keep_fp32"](model, helpers["KEEP_FP32"], torch.float16)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched
    assert fixed.encoder.layers[3].norm2.weight.dtype == torch.float32
    assert fixed.encoder.layers[30].ffn[0].weight.dtype == torch.float32
    assert fixed.encoder.layers[3].norm20.weight.dtype == torch.float16
    assert fixed.encoder.layers[31].ffn[0].weight.dtype == torch.float16
    seen = collections.defaultdict(list)
    hooks = [m.register_forward_hook(lambda m, a, out, name=name: seen[name].append(out.dtype))
             for name, m in fixed.named_modules() if name in ("encoder.layers.3.norm2", "encoder.layers.3.norm20")]
    out = fixed(x.half())
    for h in hooks:
        h.remove()
    assert out.dtype == torch.float16
    assert seen["encoder.layers.3.norm2"] == [torch.float16]  # FP32 inside, cast back at the boundary
    planned = PrecisionPlan(torch.float16, frozenset(KEPT)).apply(copy.deepcopy(model).half().float())  # the snippet rounds kept weights via FP16
    torch.testing.assert_close(out, planned(x.half()), rtol=0, atol=0)
    exported = torch.export.export(fixed, (x.half(),), strict=False)  # what compile_keep_fp32 exports
    norms = {_innermost_path(n): n.meta["val"].dtype for n in exported.graph.nodes
             if n.op == "call_function" and n.target == torch.ops.aten.layer_norm.default}
    assert norms["encoder.layers.3.norm2"] == torch.float32  # computed in FP32 inside the graph
    assert norms["encoder.layers.3.norm20"] == torch.float16
    # hooks, not a closure in forward: the kept model pickles and deep-copies, and still runs
    assert "forward" not in vars(fixed.encoder.layers[3].norm2)
    for clone in (pickle.loads(pickle.dumps(fixed)), copy.deepcopy(fixed)):
        torch.testing.assert_close(clone(x.half()), out, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(fixed, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x.half()), out, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Needs torch_tensorrt and CUDA


def _rel_l2(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return float((test - ref).norm() / ref.norm())


@needs_tensorrt
def test_kept_fp32_layernorm_compiles_in_tensorrt_with_small_error() -> None:
    torch.manual_seed(0)
    model, x = NormHead().eval().to(CUDA), torch.randn(16, 64, device=CUDA)
    with torch.no_grad():
        ref = model(x)
        fixed = PrecisionPlan(torch.float16, frozenset({"norm"})).apply(model)
        backend = TensorRTBackend()
        compiled = backend.wrap(fixed, torch.float16, (x.half(),), {}, name=ROOT)
        out = compiled(x.half())
    assert isinstance(compiled, TensorRTProgram) and backend.last_info is compiled.info
    info = compiled.info
    assert info.segments >= 1 and info.dtype == torch.float16 and info.version
    assert info.trt_fraction is not None and info.trt_fraction > 0.5
    assert any(name.startswith("_run_on_acc") for name, _ in compiled.graph_module.named_children())
    assert _rel_l2(ref, out.float()) < 1e-2, str(info)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    # the engine's own layers, named in the model's modules (Myelin may hide inner ones in a ForeignNode)
    by_module = layers_by_module(info.layers)
    assert info.layers and set(by_module) <= {name or ROOT for name, _ in model.named_modules()}, info.layers
    if not any("ForeignNode" in layer.name for layer in info.layers):
        assert any("NORMALIZATION" in layer.types for layer in by_module["norm"]), by_module
    assert "layers: " in str(info)


@needs_tensorrt
def test_kwargs_and_tuple_outputs_pass_through() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, *, scale):
            return self.a(x) * scale, self.b(x)

    model, x, s = Pair().eval().to(CUDA), torch.randn(4, 8, device=CUDA), torch.full((1,), 0.5, device=CUDA)
    with torch.no_grad():
        ref = model(x, scale=s)
        compiled = TensorRTBackend().wrap(copy.deepcopy(model).half(), torch.float16, (x.half(),), {"scale": s.half()})
        out = compiled(x.half(), scale=s.half())
    assert isinstance(out, tuple) and len(out) == 2
    for r, o in zip(ref, out):
        assert _rel_l2(r, o.float()) < 1e-2


@needs_tensorrt
@pytest.mark.parametrize("route", ["compile_keep_fp32", "compile_autocast"])
def test_snippet_runs_in_tensorrt(route: str) -> None:
    torch.manual_seed(0)
    model, x = NormHead().eval().to(CUDA), torch.randn(16, 64, device=CUDA)
    snippet = tensorrt_snippet(["norm"], torch.float16)
    namespace: dict = {}
    with torch.no_grad():
        exec(compile(snippet, "<snippet>", "exec"), namespace)  # defines the two routes
        trt_model = namespace[route](model, (x,))
        cast = namespace["_cast"]
        dtype = torch.float16 if route == "compile_keep_fp32" else torch.float32
        out = trt_model(*cast((x,), dtype))
        ref = model(x)
    assert any(name.startswith("_run_on_acc") for name, _ in trt_model.named_children())
    assert _rel_l2(ref, out.float()) < 1e-2
