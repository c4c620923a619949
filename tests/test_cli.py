"""The torchprobe command, run as a real subprocess on tiny real models, plus its in-process parts.

Each subprocess pays the torch import (~2 s), so commands are exercised as a user would run them
once per behaviour, and the details (input specs, factories, files, --debug, progress) are tested
in-process through ``cli.main`` and the helpers it uses.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchprobe import cli, progress
from torchprobe.io.dumps import save_dump
from torchprobe.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[1]

# fc1's weights are scaled by 2000 and the inputs by 40, so fc1's output reaches ~1e5: beyond the
# FP16 max (65504) but well inside BF16's range. eager:fp16 diverges (inf), eager:bf16 passes.
FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    def _model():
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("fc1", nn.Linear(16, 32))
        model.add_module("norm", nn.LayerNorm(32))
        model.add_module("fc2", nn.Linear(32, 4))
        with torch.no_grad():
            model.fc1.weight.mul_(2000)
        return model.eval()


    def build():
        return _model(), torch.randn(2, 16, generator=torch.Generator().manual_seed(0)) * 40


    def build_small_inputs():
        return _model(), torch.randn(2, 16, generator=torch.Generator().manual_seed(0))


    def bare():
        return nn.Linear(3, 3)


    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, y=None):
            return self.fc(x) if y is None else self.fc(x) + y


    def not_a_model():
        return {"model": 1}


    def broken():
        raise ValueError("the factory blew up")
    """
)


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "torchprobe", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, and the line names ``words``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_factory.py"
    path.write_text(FACTORY)
    return path


@pytest.fixture
def dumps(tmp_path: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(1)
    ref = {"fc1": torch.randn(4, 8, generator=g), "norm": torch.randn(4, 8, generator=g), "fc2": torch.randn(4, 2, generator=g)}
    perturbed = {**ref, "norm": ref["norm"] + 1.0}
    return {
        "a": save_dump(tmp_path / "a.safetensors", ref, target="fp32"),
        "same": save_dump(tmp_path / "same.safetensors", dict(ref), target="fp32"),
        "bad": save_dump(tmp_path / "bad.safetensors", perturbed, target="eager:fp16"),
    }


# ------------------------------------------------------------------------ subprocess: report


def test_report_finds_the_fp16_overflow_and_writes_json(factory: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run_cli("report", f"{factory}:build", "--target", "eager:fp16", "--target", "eager:bf16",
                   "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    text = proc.stdout
    assert "eager:fp16" in text and "DIVERGES" in text
    assert "eager:bf16" in text and "OK" in text
    assert "fc1" in text and "overflow" in text
    assert "Traceback" not in proc.stderr
    data = json.loads(out.read_text())
    assert data["format"] == "torchprobe-report"
    assert data["targets"] == ["eager:fp16", "eager:bf16"]
    passed = {o["target"]: o["passed"] for o in data["outcomes"]}
    assert passed == {"eager:fp16": False, "eager:bf16": True}
    assert any(c["module"] == "fc1" and c["target"] == "eager:fp16" for c in data["culprits"])


def test_report_passes_with_exit_0_and_quiet_prints_one_line_per_target(factory: Path, tmp_path: Path) -> None:
    # The module name form (not a path): the working directory is searched for it.
    proc = run_cli("report", "tiny_factory:build_small_inputs", "-t", "eager:fp16", "-t", "eager:bf16",
                   "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in lines] == ["eager:fp16", "eager:bf16"]
    assert all(": OK: " in line for line in lines)
    assert proc.stderr == ""


@pytest.mark.parametrize(
    "args, words",
    [
        (["-t", "bogus:fp16", "-i", "2x16"], ["--target", "bogus:fp16", "valid targets"]),
        (["-t", "eager:fp16", "-i", "2xq"], ["--input", "2xq", "'q'"]),
    ],
    ids=["unknown-target", "bad-input-spec"],
)
def test_report_bad_arguments_are_one_line(factory: Path, tmp_path: Path, args: list[str], words: list[str]) -> None:
    assert_one_line_error(run_cli("report", f"{factory}:build", *args, cwd=tmp_path), *words)


def test_report_nonexistent_factory_is_one_line(factory: Path, tmp_path: Path) -> None:
    line = assert_one_line_error(
        run_cli("report", f"{factory}:nope", "-t", "eager:fp16", cwd=tmp_path), "nope", "build"
    )
    assert line.startswith("torchprobe report: error:")


# ----------------------------------------------------------------------- subprocess: compare


def test_compare_names_the_diverging_key(dumps: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli("compare", str(dumps["a"]), str(dumps["bad"]), "--tol", "1e-2", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "first divergence: norm" in first
    assert "DIVERGE" in proc.stdout


def test_compare_identical_dumps_exit_0_and_json(dumps: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    proc = run_cli("compare", str(dumps["a"]), str(dumps["same"]), "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("all 3 tensors match")
    assert json.loads(out.read_text())["metric"] == "rel_l2"


def test_compare_missing_file_is_one_line(dumps: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    assert_one_line_error(run_cli("compare", str(dumps["a"]), str(missing), cwd=tmp_path), str(missing))


# ----------------------------------------------------------------------- subprocess: weights


def test_weights_names_the_overflowing_tensor(tmp_path: Path) -> None:
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": {"head.weight": torch.full((3, 4), 1e5), "head.bias": torch.zeros(3)}, "epoch": 3}, ckpt)
    proc = run_cli("weights", str(ckpt), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "head.weight" in proc.stdout.splitlines()[0]
    assert "overflow" in proc.stdout


# ------------------------------------------------------------------------- subprocess: other


def test_top_level_help_lists_every_command(tmp_path: Path) -> None:
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in ("demo", "report", "compare", "weights", "exit status"):
        assert command in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("torchprobe.demo") is None, reason="torchprobe.demo is not written yet")
def test_demo_runs(tmp_path: Path) -> None:
    proc = run_cli("demo", "--quiet", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = shutil.which("torchprobe", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the torchprobe console script is not installed (pip install -e .)")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("torchprobe ")


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("command", ["demo", "report", "compare", "weights"])
def test_help_of_each_command(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: torchprobe {command}")
    assert "exit status" in out


def test_report_help_documents_input_specs(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    out = capsys.readouterr().out
    for text in ("2x3x32x32", "8x128:int64", "[0, 100)", "--seed", ".safetensors", "weights_only=True", "--input-kwargs"):
        assert text in out


def test_missing_command_and_unknown_option_are_one_line(capsys: pytest.CaptureFixture) -> None:
    assert cli.main([]) == 2
    assert cli.main(["report", "x:y", "-t", "eager:fp16", "--frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "COMMAND" in err[0] and "--frobnicate" in err[1]


@pytest.mark.parametrize(
    "text, shape, dtype, n",
    [
        ("2x3x32x32", (2, 3, 32, 32), torch.float32, None),
        ("2x16:float32", (2, 16), torch.float32, None),
        ("2x16:fp16:300", (2, 16), torch.float16, 300.0),
        ("8x128:int64", (8, 128), torch.int64, None),
        ("8X128:Int64:30522", (8, 128), torch.int64, 30522),
        ("7", (7,), torch.float32, None),
        ("4x4:bool", (4, 4), torch.bool, None),
    ],
)
def test_parse_input_spec(text: str, shape: tuple, dtype: torch.dtype, n: float | None) -> None:
    spec = cli.parse_input_spec(text)
    assert (spec.shape, spec.dtype, spec.n, spec.path) == (shape, dtype, n, None)


@pytest.mark.parametrize(
    "text, words",
    [
        ("2xq", ["'q'"]), ("2x0", ["'0'"]), ("", ["SHAPE"]), ("2x3:float8", ["float8", "valid dtypes"]),
        ("2x3:fp16:-1", ["standard deviation"]), ("2x3:int64:1.5", ["upper bound"]),
        ("2x3:bool:2", ["bool"]), ("2:fp32:1:2", ["SHAPE"]), ("nope.pt", ["nope.pt", "does not exist"]),
    ],
)
def test_parse_input_spec_rejects(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidArgument) as exc:
        cli.parse_input_spec(text)
    for word in words:
        assert word in str(exc.value)


def test_random_inputs_are_seeded_and_in_range() -> None:
    specs = [cli.parse_input_spec(s) for s in ("64x64", "64x64:int64", "64x64:int32:7", "64x64:bf16:300")]
    first = cli.build_inputs(specs, seed=3, kwargs_from_safetensors=False)
    again = cli.build_inputs(specs, seed=3, kwargs_from_safetensors=False)
    other = cli.build_inputs(specs, seed=4, kwargs_from_safetensors=False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    floats, ints, small, wide = first
    assert floats.dtype == torch.float32 and 0.8 < floats.std().item() < 1.2
    assert ints.dtype == torch.int64 and ints.min() >= 0 and ints.max() < 100 and ints.max() > 90
    assert small.dtype == torch.int32 and small.max() == 6
    assert wide.dtype == torch.bfloat16 and 200 < wide.float().std().item() < 400


def test_input_files_give_positional_or_keyword_inputs(tmp_path: Path) -> None:
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    st = save_dump(tmp_path / "in.safetensors", {"x": x, "y": y}, target="fp32")
    torch.save((x, y), tmp_path / "tuple.pt")
    torch.save({"x": x}, tmp_path / "dict.pt")
    torch.save(x, tmp_path / "tensor.pt")

    def build(*texts: str, kwargs: bool = False):
        return cli.build_inputs([cli.parse_input_spec(str(tmp_path / t)) for t in texts], seed=0, kwargs_from_safetensors=kwargs)

    positional = build("in.safetensors")
    assert isinstance(positional, tuple) and torch.equal(positional[0], x) and torch.equal(positional[1], y)
    keyword = build("in.safetensors", kwargs=True)
    assert set(keyword) == {"x", "y"} and torch.equal(keyword["y"], y)
    assert len(build("tuple.pt", "tensor.pt")) == 3
    assert set(build("dict.pt")) == {"x"}
    with pytest.raises(InvalidArgument, match="mix 1 positional and 1 keyword"):
        build("tensor.pt", "dict.pt")
    with pytest.raises(InvalidArgument, match="already given"):
        build("dict.pt", "in.safetensors", kwargs=True)


def test_unsafe_pt_input_is_refused(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(InvalidArgument, match="weights_only=True"):
        cli.build_inputs([cli.parse_input_spec(str(tmp_path / "module.pt"))], seed=0, kwargs_from_safetensors=False)


def test_report_in_process_with_keyword_inputs_from_safetensors(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_dump(tmp_path / "xy.safetensors", {"x": torch.randn(2, 3), "y": torch.randn(2, 3)}, target="fp32")
    model = f"{factory}:TwoInputs"
    code = cli.main(["report", model, "-i", str(tmp_path / "xy.safetensors"), "--input-kwargs", "-t", "eager:fp16", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("eager:fp16: OK: final rel_l2")


@pytest.mark.parametrize(
    "factory_name, extra, words",
    [
        ("bare", [], ["returned a model without inputs", "--input"]),
        ("not_a_model", ["-i", "2x3"], ["must return an nn.Module", "dict"]),
        ("broken", ["-i", "2x3"], ["ValueError: the factory blew up", "--debug"]),
        ("bare", ["-i", "2x4"], ["RuntimeError", "--debug"]),  # the model itself fails on the inputs
    ],
)
def test_report_factory_and_model_failures_are_one_line(
    factory: Path, factory_name: str, extra: list[str], words: list[str], capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["report", f"{factory}:{factory_name}", "-t", "eager:fp16", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for word in words:
        assert word in err[0]


@pytest.mark.parametrize(
    "model, words",
    [
        ("no_such_module_xyz:build", ["no module named 'no_such_module_xyz'"]),
        ("missing_dir/model.py:build", ["missing_dir/model.py", "does not exist"]),
        ("just_a_name", ["MODULE:FACTORY"]),
    ],
)
def test_report_unloadable_model_spec(model: str, words: list[str], capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["report", model, "-t", "eager:fp16", "-i", "2x3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_report_checks_output_paths_before_running(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "no_dir" / "r.json"
    assert cli.main(["report", f"{factory}:broken", "-t", "eager:fp16", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no_dir" in err and "does not exist" in err and "blew up" not in err


def test_debug_reraises_with_the_cause(factory: Path) -> None:
    with pytest.raises(cli.CliError) as exc:
        cli.main(["--debug", "report", f"{factory}:broken", "-t", "eager:fp16", "-i", "2x3"])
    assert isinstance(exc.value.__cause__, ValueError)
    with pytest.raises(RuntimeError):
        cli.main(["report", f"{factory}:bare", "-t", "eager:fp16", "-i", "2x4", "--debug"])


def test_unexpected_error_is_one_line_with_debug_hint(monkeypatch: pytest.MonkeyPatch, dumps: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    # The module, not the function torchprobe.compare that the package exports under the same name.
    dump_module = importlib.import_module("torchprobe.compare")

    def explode(*args, **kwargs):
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(dump_module, "compare", explode)
    assert cli.main(["compare", str(dumps["a"]), str(dumps["same"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["torchprobe compare: error: ZeroDivisionError: boom (run with --debug for the traceback)"]


def test_weights_missing_checkpoint_and_include(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["weights", str(tmp_path / "nope.pth")]) == 2
    ckpt = tmp_path / "ok.pth"
    torch.save({"a.weight": torch.ones(2), "b.weight": torch.full((2,), 1e5)}, ckpt)
    assert cli.main(["weights", str(ckpt), "--include", "a.*", "-q"]) == 0
    assert cli.main(["weights", str(ckpt), "--include", "zzz*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope.pth" in err[0] and "zzz*" in err[1]


def test_demo_without_the_demo_module_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "torchprobe.demo", None)  # import of it raises ModuleNotFoundError
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchprobe.demo" in err[0]


def test_verbose_logging_is_restored_afterwards(dumps: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    logger = logging.getLogger("torchprobe")
    before = (logger.level, list(logger.handlers))
    assert cli.main(["compare", str(dumps["a"]), str(dumps["same"]), "-vv"]) == 0
    assert (logger.level, list(logger.handlers)) == before
    assert "torchprobe.compare: DEBUG" in capsys.readouterr().err


# ------------------------------------------------------------------------------- progress


def test_progress_is_silent_off_a_tty_and_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="torchprobe.progress"):
        assert list(progress.progress(range(3), desc="passes")) == [0, 1, 2]
    assert [r.getMessage() for r in caplog.records] == ["passes: 1/3", "passes: 2/3", "passes: 3/3"]


def test_quiet_is_context_managed_and_nests() -> None:
    assert not progress.is_quiet()
    with progress.quiet():
        assert progress.is_quiet()
        with progress.quiet(False):
            assert not progress.is_quiet()
        assert progress.is_quiet()
        with pytest.raises(KeyError), progress.quiet(False):
            raise KeyError
        assert progress.is_quiet()
    assert not progress.is_quiet()


def test_progress_bar_when_enabled_and_not_quiet(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("tqdm")
    assert list(progress.progress(iter("abc"), total=3, desc="bars", enabled=True)) == ["a", "b", "c"]
    assert "bars" in capsys.readouterr().err
    with progress.quiet():
        assert list(progress.progress("abc", desc="hidden", enabled=True)) == ["a", "b", "c"]
    assert "hidden" not in capsys.readouterr().err
    assert list(progress.progress("abc", desc="off", enabled=False)) == ["a", "b", "c"]
    assert "off" not in capsys.readouterr().err


def test_progress_bar_closes_when_the_loop_stops_early(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("tqdm")
    it = progress.progress(range(10), desc="early", enabled=True)
    for i in it:
        if i == 2:
            break
    it.close()  # what CPython does when the loop's generator is dropped
    from tqdm import tqdm

    assert not [bar for bar in getattr(tqdm, "_instances", ()) if getattr(bar, "desc", "").startswith("early")]


def test_report_modules_glob_limits_rows(factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    code = cli.main(["report", f"{factory}:build", "-t", "eager:fp16", "--modules", "fc*", "--json", str(out), "-q"])
    assert code == 1, capsys.readouterr().err
    modules = {row["module"] for row in json.loads(out.read_text())["rows"]}
    assert modules == {"fc1", "fc2", "(root)"}


def test_margin_with_nothing_measured_is_trouble_not_a_pass(tmp_path: Path) -> None:
    (tmp_path / "intonly.py").write_text(
        "import torch\n"
        "class Emb(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(10, 4)\n"
        "    def forward(self, ids):\n"
        "        return self.emb(ids)\n"
        "def build():\n"
        "    return Emb(), torch.randint(0, 10, (2, 3))\n")
    proc = run_cli("margin", "intonly:build", "-t", "eager:fp16", cwd=tmp_path)
    assert_one_line_error(proc, "no module got a margin")
