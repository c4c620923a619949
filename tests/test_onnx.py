"""Engine outputs in module names: ONNX scopes, Polygraphy and ONNX Runtime results, compare(onnx=).

Everything here runs the real tools on CPU: torch.onnx.export(dynamo=True), ONNX Runtime through
Polygraphy (its CLI as a subprocess once, its Python API elsewhere), and the torchprobe CLI. The
ONNX tensor names are checked by value: a tensor that ONNX Runtime computed for the undeployed
graph must equal the PyTorch tensor of the row it was named after.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="needs onnx (pip install 'torchprobe[polygraphy]')")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'torchprobe[polygraphy]')")
pytest.importorskip("polygraphy", reason="needs polygraphy (pip install 'torchprobe[polygraphy]')")

from onnx import numpy_helper  # noqa: E402
from polygraphy import constants as pg_constants  # noqa: E402
from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath  # noqa: E402
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx  # noqa: E402
from polygraphy.comparator import RunResults  # noqa: E402
from polygraphy.json import load_json  # noqa: E402
from polygraphy.logger import G_LOGGER  # noqa: E402

import torchprobe as tp  # noqa: E402
from torchprobe import cli  # noqa: E402
from torchprobe.errors import InvalidArgument, TorchprobeError  # noqa: E402
from torchprobe.io.engine_outputs import load_engine_outputs  # noqa: E402
from torchprobe.io.onnx import Origin, onnx_scopes  # noqa: E402
from torchprobe.names import submodule  # noqa: E402

from conftest import assert_unchanged, snapshot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CULPRIT = "encoder.stages.1.downsampling_layer.1"  # a Conv2d of the ConvNeXt; its weight is scaled


# ------------------------------------------------------------------------------------ helpers


def ort_mark_all(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of the ONNX graph at ``path``, computed by ONNX Runtime (through Polygraphy)."""
    loader = SessionFromOnnx(BytesFromOnnx(ModifyOutputs(OnnxFromPath(str(path)), outputs=pg_constants.MARK_ALL)))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1), OnnxrtRunner(loader) as runner:
        return {name: np.array(value) for name, value in runner.infer(feeds).items()}


def save_run_results(path: Path, runs: dict[str, dict[str, np.ndarray]]) -> Path:
    """A Polygraphy RunResults JSON with one iteration per runner, written by Polygraphy itself."""
    results = RunResults()
    for name, outputs in runs.items():
        results.add([outputs], runner_name=name)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):
        results.save(str(path))
    return path


def scale_weight(src: Path, dst: Path, module: str, factor: float) -> str:
    """The deployed graph: the weight of ``module`` in the ONNX file scaled by ``factor``.

    The weight is the matrix/kernel initializer of the node in the module's own scope (for a
    Linear, the exporter stores it pre-transposed under another name)."""
    model = onnx.load(str(src))
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))  # torch writes repr(list)
        if len(scopes) >= 2 and scopes[-2] == module:
            weight = next((n for n in node.input if n in inits and len(inits[n].dims) >= 2), None)
            if weight is not None:
                scaled = numpy_helper.to_array(inits[weight]) * factor
                inits[weight].CopyFrom(numpy_helper.from_array(scaled, weight))
                onnx.save(model, str(dst))
                return weight
    raise AssertionError(f"no weight of {module} in {src}")


def recorded(model: nn.Module, inputs) -> tp.Recording:
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    with torch.no_grad(), tp.record(model, capture=True) as rec:
        model(*args, **kwargs)
    return rec


def assert_names_by_value(rec: tp.Recording, names: dict[str, str], engine: dict[str, np.ndarray]) -> None:
    """Each ONNX tensor named after a row holds that row's PyTorch values (ONNX Runtime, FP32)."""
    tensors = rec.tensors
    for onnx_name, key in names.items():
        ours = tensors[key].double()
        theirs = torch.from_numpy(engine[onnx_name]).double()
        assert ours.shape == theirs.shape, (key, onnx_name)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5, msg=f"{onnx_name} is not {key}")


def run_polygraphy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("polygraphy")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from polygraphy.tools._main import main; main()"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "torchprobe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], *words: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


# ------------------------------------------------------------------------------------- models


def convnext() -> tuple[nn.Module, torch.Tensor]:
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[2, 2], image_size=32, num_stages=2)
    return ConvNextModel(config).eval(), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.lin(self.lin(x)))  # back-to-back calls of one module


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(x), self.a(x)  # returned in the other order than computed


class Repeats(nn.Module):
    """Repeated calls, a module shared under two names, a tuple-returning module, a dict output."""

    def __init__(self):
        super().__init__()
        self.blk = Block()
        self.alias = self.blk.lin
        self.pair = Pair()

    def forward(self, x):
        p, q = self.pair(self.alias(self.blk(self.blk(x))))
        return {"p": p, "q": q.transpose(0, 1)}


class Chain(nn.Module):
    """fc1 -> transpose -> fc2 -> (x 2) -> fc3: fc2's input is a Transpose, fc3's a computed Mul."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 4)

    def forward(self, x):  # x: (2, 4, 6)
        return self.fc3(self.fc2(self.fc1(x).transpose(1, 2)) * 2.0)


# ------------------------------------------------------------------------------ ConvNeXt engine


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny ConvNeXt exported with export_onnx, one Conv weight scaled by 1.5 in the ONNX file,
    run by the Polygraphy CLI on ONNX Runtime with every tensor marked as an output."""
    root = tmp_path_factory.mktemp("convnext")
    model, images = convnext()
    before = snapshot(model)
    exp = tp.export_onnx(model, images, root / "model.onnx", inputs_json=root / "inputs.json")
    assert_unchanged(model, before)
    tp.dump(model, images, root / "fp32.safetensors", target="fp32")
    assert scale_weight(root / "model.onnx", root / "deployed.onnx", CULPRIT, 1.5) == f"{CULPRIT}.weight"
    proc = run_polygraphy("run", "deployed.onnx", "--onnxrt", "--onnx-outputs", "mark", "all",
                          "--load-inputs", "inputs.json", "--save-outputs", "engine.json", cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "model": model, "images": images, "export": exp}


def test_convnext_engine_divergence_is_named_by_module_in_the_cli(deployed: dict) -> None:
    root, model = deployed["root"], deployed["model"]
    rows = tp.load_dump(root / "fp32.safetensors").order
    no_ops = [k for k in rows if isinstance(submodule(model, k.partition(":")[0]), nn.Identity)]
    proc = run_cli("compare", "fp32.safetensors", "engine.json", "--onnx", "model.onnx", "--max-rows", "0", cwd=root)
    assert proc.returncode == 1, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert f"first divergence: {CULPRIT} (b: conv2d_3)" in first, first
    assert no_ops and f"matched {len(rows) - len(no_ops)} of {len(rows)} module outputs of a by name through model.onnx" in proc.stdout
    culprit_line = next(line for line in proc.stdout.splitlines() if f" {CULPRIT} -> " in line)
    assert "DIVERGE" in culprit_line and culprit_line.rstrip().endswith("introduced")


def test_convnext_engine_comparison_and_split(deployed: dict) -> None:
    root, model = deployed["root"], deployed["model"]
    cmp = tp.compare(root / "fp32.safetensors", root / "engine.json", onnx=root / "model.onnx")
    assert cmp.exit_code == 1
    first = cmp.first_divergence()
    assert first.key == CULPRIT and first.key_b == "conv2d_3"
    assert first.origin == Origin.INTRODUCED == "introduced"

    # The culprit's error, computed independently in float64 from the reference's input to it.
    a = tp.load_dump(root / "fp32.safetensors")
    conv = model.get_submodule(CULPRIT)
    x = a["encoder.stages.1.downsampling_layer.0"].double()  # channels first, as the conv takes it
    weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
    ref = torch.nn.functional.conv2d(x, weight, bias, conv.stride)
    test = torch.nn.functional.conv2d(x, weight * 1.5, bias, conv.stride)
    assert first.metrics.rel_l2 == pytest.approx(float((test - ref).norm() / ref.norm()), rel=1e-4)

    # Every row before the culprit matches; after it, the dwconv that reads its output inherits.
    keys = [row.key for row in cmp.rows]
    assert all(row.passed for row in cmp.rows[: keys.index(CULPRIT)])
    assert cmp["encoder.stages.1.layers.0.dwconv"].origin == "inherited"
    assert cmp["encoder.stages.1.layers.0"].origin == "inherited"  # its input is the culprit's output
    assert all(row.origin is None for row in cmp.rows if row.passed)
    # Only modules that run no op of their own have no engine tensor (drop_path is nn.Identity here).
    assert cmp.unmatched and all(isinstance(submodule(model, k), nn.Identity) for k in cmp.unmatched)
    assert len(cmp.rows) + len(cmp.unmatched) == len(a)
    data = cmp.to_dict()
    assert data["onnx"].endswith("model.onnx") and data["unmatched"] == list(cmp.unmatched)
    assert next(r for r in data["rows"] if r["key"] == CULPRIT)["origin"] == "introduced"


def test_export_writes_inputs_polygraphy_and_numpy_read_back(deployed: dict) -> None:
    exp, images = deployed["export"], deployed["images"]
    assert exp.input_names == ("pixel_values",)
    feeds = load_json(str(exp.inputs_json))  # Polygraphy's own loader
    assert isinstance(feeds, list) and len(feeds) == 1
    np.testing.assert_array_equal(feeds[0]["pixel_values"], images.numpy())
    with np.load(exp.inputs_npz, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["pixel_values"], images.numpy())


def test_convnext_names_are_record_keys_and_hold_their_values(deployed: dict) -> None:
    root, model, images = deployed["root"], deployed["model"], deployed["images"]
    rec = recorded(model, images)
    keys = {row.key for row in rec.rows}
    engine = ort_mark_all(root / "model.onnx", {"pixel_values": images.numpy()})
    plain = tp.onnx_names(root / "model.onnx")
    assert set(plain.values()) <= keys  # from the file alone, already record()'s keys
    named = tp.onnx_names(root / "model.onnx", reference=rec)
    assert set(named.values()) <= keys and named["conv2d_3"] == CULPRIT
    assert_names_by_value(rec, named, engine)
    assert_names_by_value(rec, plain, engine)


def test_npz_and_safetensors_engine_files_compare_like_polygraphy_json(deployed: dict) -> None:
    root = deployed["root"]
    engine = load_engine_outputs(root / "engine.json")
    np.savez(root / "engine.npz", **{k: v.numpy() for k, v in engine.tensors.items()})
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in engine.tensors.items()}, str(root / "engine.safetensors"))
    via_json = tp.compare(root / "fp32.safetensors", root / "engine.json", onnx=root / "model.onnx")
    for other in ("engine.npz", "engine.safetensors"):
        cmp = tp.compare(root / "fp32.safetensors", root / other, onnx=root / "model.onnx")
        assert [(r.key, r.passed, r.origin) for r in cmp.rows] == [(r.key, r.passed, r.origin) for r in via_json.rows]


def test_runner_choice_default_skips_the_reference(deployed: dict, capsys: pytest.CaptureFixture) -> None:
    root, images = deployed["root"], deployed["images"]
    feeds = {"pixel_values": images.numpy()}
    two = save_run_results(root / "two.json", {
        "onnxrt-reference": ort_mark_all(root / "model.onnx", feeds),
        "onnxrt-deployed": ort_mark_all(root / "deployed.onnx", feeds),
    })
    default = tp.compare(root / "fp32.safetensors", two, onnx=root / "model.onnx")
    assert default.target_b == "onnxrt-deployed" and default.first_divergence().key == CULPRIT
    reference = tp.compare(root / "fp32.safetensors", two, onnx=root / "model.onnx", runner="onnxrt-reference")
    assert reference.exit_code == 0 and len(reference.rows) == len(default.rows)
    prefix = tp.compare(root / "fp32.safetensors", two, onnx=root / "model.onnx", runner="onnxrt-ref")
    assert prefix.target_b == "onnxrt-reference" and prefix.exit_code == 0
    with pytest.raises(InvalidArgument, match="valid runners: 'onnxrt-reference', 'onnxrt-deployed'"):
        tp.compare(root / "fp32.safetensors", two, onnx=root / "model.onnx", runner="trt-runner")
    with pytest.raises(InvalidArgument, match="starts 2 runner names"):
        tp.compare(root / "fp32.safetensors", two, onnx=root / "model.onnx", runner="onnxrt")
    one_line_error(capsys, ["compare", str(root / "fp32.safetensors"), str(two), "--onnx", str(root / "model.onnx"),
                            "--runner", "trt-runner"], "runner='trt-runner'", "onnxrt-deployed")
    one_line_error(capsys, ["compare", str(root / "fp32.safetensors"), str(two), "--runner", "x"], "--onnx")


def test_bad_engine_files_are_one_line_errors(deployed: dict, capsys: pytest.CaptureFixture) -> None:
    root = deployed["root"]
    fp32, model_onnx = str(root / "fp32.safetensors"), str(root / "model.onnx")
    foreign = save_run_results(root / "foreign.json", {"trt-runner": {"output0": np.ones((1, 4), np.float32)}})
    with pytest.raises(InvalidArgument, match="none of its 1 tensors .*output0.* is a tensor of"):
        tp.compare(fp32, foreign, onnx=model_onnx)
    one_line_error(capsys, ["compare", fp32, str(foreign), "--onnx", model_onnx], "no module outputs to compare")
    # Names that happen to exist in the ONNX file, with other shapes: another model's engine.
    other = save_run_results(root / "other.json", {"trt-runner": {"conv2d_3": np.ones((2, 5), np.float32)}})
    one_line_error(capsys, ["compare", fp32, str(other), "--onnx", model_onnx], "differ in shape", "conv2d_3")
    one_line_error(capsys, ["compare", fp32, str(deployed["export"].inputs_json), "--onnx", model_onnx],
                   "not a Polygraphy RunResults file")


def test_onnx_file_without_scopes_says_how_to_reexport(deployed: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated: that is the point
        torch.onnx.export(model, (torch.randn(2, 4),), str(tmp_path / "ts.onnx"), dynamo=False)
    with pytest.raises(TorchprobeError, match=r"no module scopes.*dynamo=False.*dynamo=True"):
        tp.onnx_names(tmp_path / "ts.onnx")
    root = deployed["root"]
    one_line_error(capsys, ["compare", str(root / "fp32.safetensors"), str(root / "engine.json"),
                            "--onnx", str(tmp_path / "ts.onnx")], "no module scopes", "dynamo=True")


# ------------------------------------------------------------------------------- other models


def _matching(model: nn.Module, inputs, tmp_path: Path) -> tuple[tp.DumpComparison, tp.Recording]:
    exp = tp.export_onnx(model, inputs, tmp_path / "m.onnx")
    rec = recorded(model, inputs)
    rec.save(tmp_path / "fp32.safetensors")
    with np.load(exp.inputs_npz, allow_pickle=False) as npz:
        feeds = {name: npz[name] for name in npz.files}
    np.savez(tmp_path / "engine.npz", **ort_mark_all(exp.onnx, feeds))
    return tp.compare(tmp_path / "fp32.safetensors", tmp_path / "engine.npz", onnx=exp.onnx), rec


def test_bert_layers_every_linear_and_norm_matched_by_value(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    model = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    cmp, rec = _matching(model, {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}, tmp_path)
    assert cmp.exit_code == 0 and cmp.rows  # ONNX Runtime FP32 matches PyTorch under every name
    matched = {row.key for row in cmp.rows}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            assert name in matched, name
    assert {"(root):last_hidden_state", "(root):pooler_output", "encoder.layer.1.attention.self:0"} <= matched


def test_detector_every_linear_and_norm_matched_by_value(tmp_path: Path) -> None:
    from torchprobe.models.detector import build_detector

    model, images = build_detector()
    cmp, _ = _matching(model, images, tmp_path)
    assert cmp.exit_code == 0 and cmp.rows
    matched = {row.key for row in cmp.rows}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm, nn.BatchNorm2d)) and not name.endswith("attn.out_proj"):
            assert name in matched, name  # (MultiheadAttention calls out_proj's weights, not the module)
    assert {"encoder.layers.1.norm2", "encoder.layers.0.attn:0", "(root):boxes", "(root):logits"} <= matched


def test_repeated_shared_and_tuple_outputs_are_named_like_record(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Repeats().eval(), torch.randn(2, 8)
    exp = tp.export_onnx(model, x, tmp_path / "rep.onnx")
    rec = recorded(model, x)
    keys = [row.key for row in rec.rows]
    assert "blk.lin#4" in keys and "pair:1" in keys  # the alias's call; a tuple leaf
    engine = ort_mark_all(exp.onnx, {exp.input_names[0]: x.numpy()})

    names = tp.onnx_names(exp.onnx)
    assert set(names.values()) == {"blk.lin", "blk.lin#1", "blk.lin#2", "blk.lin#3", "blk.lin#4", "blk.norm", "blk.norm#1",
                                   "pair.a", "pair.b", "(root):q"}
    assert_names_by_value(rec, names, engine)
    match = onnx_scopes(exp.onnx).match(rec)
    assert set(match.outputs) == set(keys) and not match.unmatched
    assert_names_by_value(rec, {match.outputs[k]: k for k in ("pair:0", "pair:1", "blk#1", "(root):p")}, engine)

    # Without export_onnx's call records, back-to-back calls are one run of nodes: left unmatched, not guessed.
    plain = onnx.load(str(exp.onnx))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    scopes = onnx_scopes(tmp_path / "plain.onnx")
    assert not scopes.exact
    guessed = scopes.match(rec)
    assert {"blk.lin", "blk.lin#3", "blk", "blk#1"} <= set(guessed.unmatched)
    assert "calls in the reference" in guessed.unmatched["blk.lin"]
    assert {"pair:0", "pair:1", "blk.norm#1", "(root):p", "(root):q"} <= set(guessed.outputs)
    assert_names_by_value(rec, {v: k for k, v in guessed.outputs.items() if k in ("pair:0", "pair:1", "blk.norm#1", "(root):q")}, engine)


def test_split_follows_a_transpose_and_stops_at_arithmetic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(2, 4, 6)
    exp = tp.export_onnx(model, x, tmp_path / "chain.onnx")
    rec = recorded(model, x)
    rec.save(tmp_path / "fp32.safetensors")
    scale_weight(exp.onnx, tmp_path / "deployed.onnx", "fc1", 1.5)
    save_run_results(tmp_path / "engine.json", {"onnxrt": ort_mark_all(tmp_path / "deployed.onnx", {exp.input_names[0]: x.numpy()})})
    cmp = tp.compare(tmp_path / "fp32.safetensors", tmp_path / "engine.json", onnx=exp.onnx)
    assert [(r.key, r.passed, r.origin) for r in cmp.rows] == [
        ("fc1", False, "introduced"),
        ("fc2", False, "inherited"),  # its input is fc1's output, transposed: judged through the Transpose
        ("fc3", False, None),  # its input is fc2's output times 2, computed by the engine: not judged
        ("(root)", False, "introduced"),  # the graph input matches: the error arises inside the model
    ]
