"""The ``torchprobe`` command: ``demo``, ``report``, ``compare``, ``weights``, ``margin``.

Every command prints its result on stdout and exits like ``diff``: 0 when everything is within
tolerance, 1 when something diverges (or a weight is at risk), 2 on trouble (bad arguments,
missing or unreadable files, a factory that fails, an unexpected error). Trouble is one line on
stderr, never a traceback; ``--debug`` re-raises instead, and ``-v``/``-vv`` log INFO/DEBUG.

    $ torchprobe report models.py:build --input 2x16 --target eager:fp16 --json r.json
    $ torchprobe compare fp32.safetensors engine.safetensors --tol 1e-2 --map names.json
    $ torchprobe compare fp32.safetensors engine.json --onnx model.onnx --runner trt-runner-N0
    $ torchprobe weights model_final.pth --include 'head.*'
    $ torchprobe margin models.py:build --input 2x16 --target strict:fp16 --min-factor 2
    $ torchprobe demo

The functions behind the commands are the library's own (``report``, ``dump.compare``,
``weights.check_weights``, ``demo.main``); this module only parses arguments, builds the model and
inputs for ``report``, prints, and maps results to exit codes.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import __version__
from . import progress as _progress
from .errors import InvalidArgument, TorchprobeError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_DIVERGES, EXIT_TROUBLE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `cmd | head` gives for C tools
DEFAULT_SEED = 0
DEFAULT_INT_HIGH = 100
DEBUG_HINT = "run with --debug for the traceback"

__all__ = ["main", "build_parser", "parse_input_spec", "load_factory", "InputSpec", "CliError"]


class CliError(Exception):
    """Trouble the command reports in one line and exit status 2 (not a torchprobe API error)."""


class UsageError(CliError):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------- inputs

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64, "f64": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
_SPEC_HELP = (
    "expected SHAPE[:DTYPE[:N]] such as 2x3x32x32, 2x16:float32, 8x128:int64:30522, "
    "or a .safetensors/.pt/.pth file"
)


@dataclass(frozen=True)
class InputSpec:
    """One ``--input``: random values of a shape and dtype, or a file of tensors.

    Random floats are normal with mean 0 and standard deviation ``n`` (default 1); random integers
    are uniform in ``[0, n)`` (default 100); bools are fair coin flips. All come from one CPU
    generator seeded with ``--seed``, in the order the ``--input`` options are given.
    """

    text: str
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    n: float | None = None
    path: Path | None = None

    def random(self, generator: torch.Generator) -> torch.Tensor:
        if self.dtype == torch.bool:
            return torch.randint(0, 2, self.shape, generator=generator).bool()
        if self.dtype.is_floating_point:
            std = 1.0 if self.n is None else self.n
            return (torch.randn(self.shape, generator=generator, dtype=torch.float32) * std).to(self.dtype)
        high = DEFAULT_INT_HIGH if self.n is None else int(self.n)
        return torch.randint(0, high, self.shape, generator=generator, dtype=self.dtype)


def parse_input_spec(text: str) -> InputSpec:
    """``2x3x32x32`` | ``2x16:float32`` | ``8x128:int64[:HIGH]`` | ``2x16:fp16[:STD]`` | a file."""
    if text.lower().endswith(_FILE_SUFFIXES):
        path = Path(text)
        if not path.is_file():
            raise InvalidArgument(f"input file {text} does not exist" if not path.exists() else f"input {text} is not a file")
        return InputSpec(text, path=path)
    parts = text.strip().split(":")
    if len(parts) > 3 or not parts[0]:
        raise InvalidArgument(f"input {text!r}: {_SPEC_HELP}")
    dims = parts[0].lower().split("x")
    for d in dims:
        if not d.isdigit() or int(d) < 1:
            raise InvalidArgument(f"input {text!r}: dimension {d!r} is not a positive integer; {_SPEC_HELP}")
    dtype = torch.float32
    if len(parts) > 1:
        name = parts[1].strip().lower()
        if name not in _DTYPES:
            raise InvalidArgument(f"input {text!r}: dtype {parts[1]!r} is not known; valid dtypes: {', '.join(_DTYPES)}")
        dtype = _DTYPES[name]
    n = None
    if len(parts) > 2:
        n = _spec_number(text, parts[2], dtype)
    return InputSpec(text, tuple(int(d) for d in dims), dtype, n)


def _spec_number(text: str, raw: str, dtype: torch.dtype) -> float:
    if dtype == torch.bool:
        raise InvalidArgument(f"input {text!r}: a bool input takes no third field (got {raw!r})")
    if dtype.is_floating_point:
        try:
            std = float(raw)
        except ValueError:
            std = math.nan
        if not (math.isfinite(std) and std > 0):
            raise InvalidArgument(f"input {text!r}: the third field of a float input is its standard deviation, a positive number; got {raw!r}")
        return std
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidArgument(f"input {text!r}: the third field of an integer input is the exclusive upper bound, a positive integer; got {raw!r}")
    return int(raw)


def build_inputs(specs: Sequence[InputSpec], *, seed: int, kwargs_from_safetensors: bool) -> tuple | dict:
    """The ``inputs`` for report(): a tuple of positional args, or a dict of keyword args."""
    generator = torch.Generator().manual_seed(seed)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for spec in specs:
        if spec.path is None:
            args.append(spec.random(generator))
            continue
        loaded = _load_input_file(spec.path, kwargs_from_safetensors)
        if isinstance(loaded, dict):
            clash = sorted(set(kwargs) & set(loaded))
            if clash:
                raise InvalidArgument(f"input {spec.text}: keyword input(s) {', '.join(clash)} are already given by an earlier --input")
            kwargs.update(loaded)
        else:
            args.extend(loaded)
    if args and kwargs:
        raise InvalidArgument(
            f"inputs mix {len(args)} positional and {len(kwargs)} keyword input(s) ({', '.join(kwargs)}); "
            "give either positional inputs (shapes, tensors, tuples) or keyword inputs (dicts, --input-kwargs)"
        )
    return dict(kwargs) if kwargs else tuple(args)


def _load_input_file(path: Path, as_kwargs: bool) -> list | dict:
    if path.suffix.lower() == ".safetensors":
        from .io.dumps import load_dump  # the one module that reads safetensors

        dump = load_dump(path, require_torchprobe=False)
        if len(dump) == 0:
            raise InvalidArgument(f"input file {path} holds no tensors")
        if as_kwargs:
            return {key: dump[key] for key in dump.keys()}
        return [dump[key] for key in dump.keys()]
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors, or an object weights_only refuses
        raise InvalidArgument(
            f"input file {path} cannot be read with torch.load(weights_only=True): {_first_line(e)}; "
            "save a tensor, a tuple/list of tensors or a dict of tensors"
        ) from e
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return list(obj)
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return dict(obj)
    raise InvalidArgument(
        f"input file {path} holds a {type(obj).__name__}; expected a tensor, a tuple/list (positional inputs) "
        "or a dict with str keys (keyword inputs)"
    )


def _to_device(inputs: Any, device: torch.device) -> Any:
    from .tree import map_tensors

    return map_tensors(inputs, lambda t: t.to(device))


# -------------------------------------------------------------------------------------- factory


def load_factory(spec: str) -> Callable[[], Any]:
    """``MODULE:FACTORY``: MODULE an importable name or a ``.py`` path; FACTORY may be dotted."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise InvalidArgument(
            f"model {spec!r} must be MODULE:FACTORY, e.g. mypkg.models:build or path/to/model.py:build"
        )
    module = _import(module_part)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
            hint = f"; callables defined there: {', '.join(names[:8])}" if names else ""
            raise InvalidArgument(f"model {spec!r}: {module_part} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InvalidArgument(f"model {spec!r}: {attr} is a {type(obj).__name__}, not a callable returning a model")
    return obj


def _import(module_part: str) -> Any:
    is_path = module_part.endswith(".py") or os.sep in module_part or "/" in module_part
    if is_path:
        path = Path(module_part).resolve()
        if not path.is_file():
            raise InvalidArgument(f"model file {module_part} does not exist")
        name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else f"_torchprobe_user_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise InvalidArgument(f"model file {module_part} cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # its sibling modules import as they would when run
        sys.modules[name] = module  # dataclasses, pickling and typing look their module up here
        try:
            spec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(name, None)
            if isinstance(e, Exception):
                raise CliError(f"importing {module_part} failed: {_describe(e)} ({DEBUG_HINT})") from e
            raise
        return module
    if not all(p.isidentifier() for p in module_part.split(".")):
        raise InvalidArgument(f"model module {module_part!r} is neither a dotted module name nor a path to a .py file")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script does not put the working directory there
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as e:
        if e.name and (module_part == e.name or module_part.startswith(e.name + ".")):
            raise InvalidArgument(
                f"no module named {e.name!r} (looked in the current directory and sys.path); "
                "give an importable module name or a path to a .py file"
            ) from e
        raise CliError(f"importing {module_part} failed: {_describe(e)} ({DEBUG_HINT})") from e
    except Exception as e:
        raise CliError(f"importing {module_part} failed: {_describe(e)} ({DEBUG_HINT})") from e


def call_factory(spec: str, factory: Callable[[], Any]) -> tuple[nn.Module, Any]:
    """Call the factory; it returns a model or ``(model, inputs)`` (inputs may be None)."""
    try:
        made = factory()
    except Exception as e:
        raise CliError(f"calling {spec}() failed: {_describe(e)} ({DEBUG_HINT})") from e
    if isinstance(made, nn.Module):
        return made, None
    if isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], nn.Module):
        return made[0], made[1]
    got = type(made).__name__
    if isinstance(made, (tuple, list)):
        got = f"{got} of {len(made)} ({', '.join(type(m).__name__ for m in made[:4])})"
    raise InvalidArgument(f"{spec}() must return an nn.Module or (module, inputs); got {got}")


# ------------------------------------------------------------------------------------- commands


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module(f"{__package__}.demo")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.demo":
            raise
        raise CliError("the demo is not part of this install (torchprobe.demo is missing)") from e
    code = demo.main(quiet=args.quiet)
    return EXIT_OK if code is None else int(code)


def _cmd_report(args: argparse.Namespace) -> int:
    from .localize import report

    for path in (args.json, args.html):
        _check_writable(path)
    model, inputs = _model_and_inputs(args, args.target)
    rep = report(
        model, inputs, targets=[str(t) for t in args.target], reference=args.reference,
        modules="leaves" if args.modules == ["leaves"] else args.modules, tol=args.tol, metric=args.metric,
        margins=args.margins,
    )
    print(_summary(rep) if args.quiet else str(rep))
    for path, write in ((args.json, rep.to_json), (args.html, rep.to_html)):
        if path is not None:
            write(path)
            _note(args, f"wrote {path}")
    return rep.exit_code


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain
    from .render.explain import explain_text

    model, inputs = _model_and_inputs(args, [args.target])
    ex = explain(model, inputs, target=str(args.target), keep_fp32=args.keep_fp32 or (), norm_fp32=not args.fp16_norms)
    if args.quiet:
        print(f"{ex.target}: {len(ex.risks)} op(s) may overflow" +
              "".join(f"\n  {o.module} {o.op}: {o.risk}" for o in ex.risks))
    else:
        print(explain_text(ex, shape_ops=args.all))
    return EXIT_DIVERGES if ex.risks else EXIT_OK


def _summary(rep: Any) -> str:
    """One line per target (for --quiet): verdict, final error against tol, top culprits."""
    from .render.text import summary_lines

    return "\n".join(summary_lines(rep))


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    _check_writable(args.json)
    options: dict[str, Any] = {"metric": args.metric, "mapping": args.map}
    if args.onnx is not None:
        options.update(onnx=args.onnx, runner=args.runner)
    elif args.runner is not None:
        raise InvalidArgument("--runner picks a runner of a Polygraphy file; it needs --onnx MODEL.onnx")
    if args.tol is not None:
        options["tol"] = args.tol
    result = compare(args.a, args.b, **options)
    print(result.to_text(max_rows=args.max_rows or None))
    _write_json(args, result.to_dict())
    return result.exit_code


def _cmd_weights(args: argparse.Namespace) -> int:
    from .weights import check_weights

    _check_writable(args.json)
    rep = check_weights(args.checkpoint, include=args.include)
    print(rep)
    _write_json(args, rep.to_dict())
    return EXIT_OK if rep else EXIT_DIVERGES


def _model_and_inputs(args: argparse.Namespace, targets: Sequence[Any]) -> tuple[nn.Module, Any]:
    """The factory's model and the inputs (``--input`` over the factory's), on ``--device``;
    CliError when a target's backend cannot run there."""
    from .targets import get_backend, model_device

    model, inputs = call_factory(args.model, load_factory(args.model))
    if args.input:
        inputs = build_inputs(args.input, seed=args.seed, kwargs_from_safetensors=args.input_kwargs)
    elif inputs is None:
        raise InvalidArgument(f"{args.model}() returned a model without inputs; pass --input, e.g. --input 2x16")
    if args.device is not None:
        model = model.to(args.device)  # the command's own model, built by the factory above
    device = args.device if args.device is not None else model_device(model)
    inputs = _to_device(inputs, device)
    for target in targets:
        reason = get_backend(target.backend).unavailable(device)
        if reason:
            raise CliError(f"target {target} cannot run here: {reason}")
    return model, inputs


def _cmd_margin(args: argparse.Namespace) -> int:
    from .localize.margin import margin

    _check_writable(args.json)
    if not 1.0 < args.max_factor < math.inf:
        raise InvalidArgument(f"--max-factor must be a finite number above 1 (e.g. 1024); got {args.max_factor:g}")
    if not 1.0 <= args.min_factor <= args.max_factor:
        raise InvalidArgument(f"--min-factor must be between 1 and --max-factor ({args.max_factor:g}); got {args.min_factor:g}")
    model, inputs = _model_and_inputs(args, [args.target])
    mg = margin(model, inputs, str(args.target), modules=args.modules, tol=args.tol, max_factor=args.max_factor,
                metric=args.metric)
    if len(mg) == 0:  # nothing measured is not a pass
        why = "; ".join(f"{s.module}: {s.why}" for s in mg.skipped[:3]) or "no module ran"
        raise CliError(f"no module got a margin under {mg.target} ({why}); choose modules with --modules")
    low = mg.below(args.min_factor)
    if args.quiet:
        w = mg.weakest
        weakest = "no module measured" if w is None else f"weakest {w.module} at x{w.factor:.3g}"
        print(f"{mg.target}: {len(low)} of {len(mg)} modules below x{args.min_factor:g}; {weakest}")
    else:
        print(mg)
        print(f"{len(low)} of {len(mg)} modules break below x{args.min_factor:g} (--min-factor)")
    if args.json is not None:
        mg.to_json(args.json)
        _note(args, f"wrote {args.json}")
    return EXIT_DIVERGES if low else EXIT_OK


def _write_json(args: argparse.Namespace, data: dict) -> None:
    import json

    from .io.atomic import write_text

    if args.json is not None:
        write_text(args.json, json.dumps(data, indent=1))
        _note(args, f"wrote {args.json}")


def _check_writable(path: str | None) -> None:
    """Fail before the work, not after it, when an output file cannot be created."""
    if path is None:
        return
    parent = Path(path).parent
    if not parent.is_dir():
        raise InvalidArgument(f"cannot write {path}: directory {parent} does not exist; create it first")
    if Path(path).is_dir():
        raise InvalidArgument(f"cannot write {path}: it is a directory; give a file name")


def _note(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


# --------------------------------------------------------------------------------------- parser


def _target_type(text: str) -> Any:
    from .targets import parse_target

    try:
        return parse_target(text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    except ImportError as e:
        raise argparse.ArgumentTypeError(f"target {text!r}: its backend cannot be loaded: {_describe(e)}") from e


def _input_type(text: str) -> InputSpec:
    try:
        return parse_input_spec(text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _metric_type(text: str) -> str:
    from .metrics import get_metric

    try:
        get_metric(text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _tol_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"tolerance must be a number such as 1e-2; got {text!r}")
    return value


def _device_type(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device such as cpu, cuda or cuda:1") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    return device


def _count_type(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer; got {text!r}")
    return int(text)


_EPILOG = """\
exit status: 0 all within tolerance, 1 something diverges (or is at risk), 2 trouble
(bad arguments, unreadable files, a failing factory, an unexpected error: one line on stderr).
"""

_REPORT_EPILOG = """\
MODEL is MODULE:FACTORY. MODULE is an importable module name (the current directory is searched)
or a path to a .py file; FACTORY is a callable taking no arguments that returns an nn.Module or
(module, inputs), inputs being a tensor, a tuple of positional args or a dict of keyword args.

--input SPEC (repeatable, one positional argument each, in order; overrides the factory's inputs):
  2x3x32x32             float32, normal(0, 1)
  2x16:fp16:300         float16, normal(0, 300): the third field is the standard deviation
  8x128:int64           integers uniform in [0, 100)
  8x128:int64:30522     integers uniform in [0, 30522): the third field is the exclusive bound
  4x4:bool              random booleans
  inputs.safetensors    its tensors in natural key order as positional args, or as keyword args
                        named by key with --input-kwargs
  inputs.pt             torch.load(weights_only=True): a tensor, a tuple/list (positional args)
                        or a dict (keyword args)
Random inputs come from one generator seeded with --seed, on the CPU, then moved to the model's
device. dtypes: float32 fp32 float16 fp16 half bfloat16 bf16 float64 fp64 int64 long int32 int
int16 int8 uint8 bool.

examples:
  torchprobe report models.py:build --input 2x16 --target eager:fp16 --target eager:bf16
  torchprobe report mypkg.detector:make --input batch.pt --target strict:fp16 --html r.html
  torchprobe report lm.py:build --input 1x128:int64:32000 --target autocast:bf16 --json r.json -q
"""


_MARGIN_EPILOG = """\
MODEL and --input as for 'torchprobe report' (see 'torchprobe report --help').
Integer and bool inputs, and arguments named like masks or positions (*mask*, *_ids, position*),
are never scaled.

examples:
  torchprobe margin models.py:build --input 2x16 -t strict:fp16
  torchprobe margin lm.py:build --input 1x128:int64:30522 -t strict:fp16 --min-factor 4 --json m.json
"""


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The factory, its inputs and the device: shared by report, explain and margin."""
    p.add_argument("model", metavar="MODULE:FACTORY", help="where to get the model, e.g. models.py:build")
    p.add_argument("--input", "-i", action="append", type=_input_type, metavar="SPEC", default=[],
                   help="a shape[:dtype[:n]] of random values or a .safetensors/.pt file (repeatable; see 'report --help')")
    p.add_argument("--input-kwargs", action="store_true",
                   help="pass the tensors of .safetensors inputs as keyword arguments named by key")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of random inputs (default {DEFAULT_SEED})")
    p.add_argument("--device", type=_device_type, default=None,
                   help="move the model and inputs there (default: where the factory put the model)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="let errors raise with a full traceback")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log INFO (-v) or DEBUG (-vv) messages on stderr")
    fmt = argparse.RawDescriptionHelpFormatter

    parser = _Parser(
        prog="torchprobe", parents=[common], formatter_class=fmt, epilog=_EPILOG,
        description="Find where and why a PyTorch model's numerics go wrong in FP16/BF16/TensorRT.",
    )
    parser.add_argument("--version", action="version", version=f"torchprobe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", parents=[common], formatter_class=fmt, epilog=_EPILOG,
                       help="run the built-in walkthrough on a small model",
                       description="Run the built-in walkthrough: a model that breaks in FP16, found and fixed.")
    p.add_argument("-q", "--quiet", action="store_true", help="less output, no progress bars")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("report", parents=[common], formatter_class=fmt, epilog=_REPORT_EPILOG + "\n" + _EPILOG,
                       help="find the modules that break a model under each target",
                       description="Run the factory's model under each target against an FP32 (or FP64) reference;\n"
                                   "print the verdict per target, the culprit modules and a per-module table.")
    _add_model_arguments(p)
    p.add_argument("--target", "-t", action="append", type=_target_type, metavar="T", required=True,
                   help="backend:dtype, e.g. eager:fp16, autocast:bf16, strict:fp16 (Torch-TensorRT), "
                        "strict-onnx:fp16 (ONNX parser path), inductor:fp16, tensorrt:fp16 (repeatable)")
    p.add_argument("--reference", choices=("fp32", "fp64"), default="fp32", help="reference precision (default fp32)")
    p.add_argument("--tol", type=_tol_type, default=None,
                   help="bound on --metric for the final output and each module's local error "
                        "(default per dtype: fp16 1e-2, bf16 5e-2 relative L2)")
    p.add_argument("--metric", type=_metric_type, default="rel_l2",
                   help="rel_l2 (default), max_abs, cosine (tol on 1 - cosine) or sqnr (tol in dB, a minimum)")
    p.add_argument("--modules", action="append", metavar="GLOB", default=None,
                   help="per-module rows only for names matching GLOB (repeatable), or 'leaves'; the output is always measured")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--html", metavar="PATH", help="also write the report as a self-contained HTML page")
    p.add_argument("--margins", action="store_true", help="also measure each leaf's growth margin under every target (a column, JSON, HTML)")
    p.add_argument("-q", "--quiet", action="store_true", help="print one verdict line per target; no progress bars")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("explain", parents=[common], formatter_class=fmt, epilog=_REPORT_EPILOG + "\n" + _EPILOG,
                       help="list the ops each module becomes in an engine, their dtypes and rules",
                       description="Export the factory's model cast to the target dtype, lower it as the target's\n"
                                   "engine does and list per module the ops that reach the engine: dtype, the rule\n"
                                   "that computes each, its FP32 value and whether it may overflow.")
    _add_model_arguments(p)
    p.add_argument("--target", "-t", type=_target_type, metavar="T", default="strict:fp16",
                   help="strict:fp16 (default; Torch-TensorRT), strict-onnx:fp16 (ONNX parser), or bf16")
    p.add_argument("--keep-fp32", action="append", metavar="NAME", default=None,
                   help="a module kept in FP32, as a fix would (repeatable)")
    p.add_argument("--fp16-norms", action="store_true",
                   help="read normalization layers as computed in the dtype (the pessimistic reading)")
    p.add_argument("--all", action="store_true", help="also list ops without arithmetic (views, copies, indexing)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the ops that may overflow")
    p.set_defaults(run=_cmd_explain)

    p = sub.add_parser("compare", parents=[common], formatter_class=fmt, epilog=_EPILOG,
                       help="compare two activation dumps key by key",
                       description="Compare dump B (under test) with dump A (the reference), tensor by tensor,\n"
                                   "in A's call order; name the first divergence.")
    p.add_argument("a", metavar="A.safetensors", help="reference dump (e.g. written by tp.dump or rec.save at fp32)")
    p.add_argument("b", metavar="B", help="dump under test (any safetensors file; with --onnx also a Polygraphy .json or .npz)")
    p.add_argument("--tol", type=_tol_type, default=None, help="bound on --metric per tensor (default 1e-2)")
    p.add_argument("--metric", type=_metric_type, default="rel_l2", help="rel_l2 (default), max_abs, cosine, sqnr")
    p.add_argument("--map", metavar="MAP.json", default=None,
                   help='JSON object mapping keys of A to keys of B, e.g. {"head": "output0"}')
    p.add_argument("--onnx", metavar="MODEL.onnx", default=None,
                   help="B is an engine's outputs keyed by ONNX tensor name (Polygraphy --save-outputs .json, .npz "
                        "or .safetensors); name them by module through this ONNX file's scopes (export with dynamo=True)")
    p.add_argument("--runner", metavar="NAME", default=None,
                   help="with --onnx: the Polygraphy runner to read (default: the first that is not the reference)")
    p.add_argument("--max-rows", type=_count_type, default=40, metavar="N",
                   help="rows shown in the table (default 40; 0 shows all)")
    p.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser("weights", parents=[common], formatter_class=fmt, epilog=_EPILOG,
                       help="check a checkpoint's weights for FP16/BF16 overflow and flush to zero",
                       description="Measure every floating tensor of CHECKPOINT (.safetensors, or anything\n"
                                   "torch.load(weights_only=True) reads) for FP16/BF16 range and rounding.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="e.g. model_final.pth or model.safetensors")
    p.add_argument("--include", action="append", metavar="GLOB", default=None,
                   help="only names matching GLOB, e.g. 'encoder.*' (repeatable)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    p.set_defaults(run=_cmd_weights)

    p = sub.add_parser("margin", parents=[common], formatter_class=fmt, epilog=_MARGIN_EPILOG + "\n" + _EPILOG,
                       help="how much each module's inputs may grow before it breaks under a target",
                       description="Run each module alone under the target on its FP32 reference inputs scaled by a\n"
                                   "factor, and find by bisection the factor at which it breaks (local error above tol,\n"
                                   "or Inf/NaN where FP32 is finite). Exit 1 when a module breaks below --min-factor.")
    _add_model_arguments(p)
    p.add_argument("--target", "-t", type=_target_type, metavar="T", required=True,
                   help="backend:dtype, e.g. strict:fp16, eager:fp16, autocast:fp16, eager:bf16")
    p.add_argument("--tol", type=_tol_type, default=None,
                   help="bound on each module's local --metric (default per dtype: fp16 1e-2, bf16 5e-2 relative L2)")
    p.add_argument("--metric", type=_metric_type, default="rel_l2", help="rel_l2 (default), max_abs, cosine, sqnr")
    p.add_argument("--modules", action="append", metavar="GLOB", default=None,
                   help="measure the modules matching GLOB (repeatable; default: every leaf module)")
    p.add_argument("--max-factor", type=_tol_type, default=1024.0, metavar="S",
                   help="largest input growth tried (default 1024); modules fine there never break")
    p.add_argument("--min-factor", type=_tol_type, default=2.0, metavar="S",
                   help="exit 1 when a module breaks below this factor (default 2: less than one doubling)")
    p.add_argument("--json", metavar="PATH", help="also write the margins as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print one line; no progress bars")
    p.set_defaults(run=_cmd_margin)
    return parser


# ----------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
    prog = "torchprobe"
    try:
        args = build_parser().parse_args(argv)
        prog = f"torchprobe {args.command}"
        debug = getattr(args, "debug", False)
        with _logging(getattr(args, "verbose", 0)), _progress.quiet(getattr(args, "quiet", False)):
            return args.run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        _say(f"{prog}: interrupted")
        return 130
    except BrokenPipeError:  # `torchprobe report ... | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except UsageError as e:
        _say(str(e))
        return EXIT_TROUBLE
    except (CliError, TorchprobeError, OSError) as e:
        if debug:
            raise
        _say(f"{prog}: error: {_one_line(str(e)) or type(e).__name__}")
        return EXIT_TROUBLE
    except Exception as e:
        if debug:
            raise
        _say(f"{prog}: error: {_describe(e)} ({DEBUG_HINT})")
        return EXIT_TROUBLE


@contextlib.contextmanager
def _logging(verbosity: int) -> Any:
    """With -v/-vv, torchprobe's loggers print INFO/DEBUG on stderr for the command's duration.

    Without it logging is left alone (warnings still reach stderr through Python's last-resort
    handler); either way the caller's logging setup is as it was afterwards.
    """
    if not verbosity:
        yield
        return
    logger = logging.getLogger(__package__)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    level = logging.INFO if verbosity == 1 else logging.DEBUG
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", _ANSI.sub("", text).strip())


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:500]


def _describe(e: BaseException) -> str:
    text = _first_line(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
