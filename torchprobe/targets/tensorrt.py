"""``tensorrt``: Torch-TensorRT compile of the dtype-cast module, strongly typed.

This is the only module that imports ``torch_tensorrt``, always lazily: ``import torch_tensorrt``
imports TensorRT and queries the GPU at import time, so it fails on a machine without one.

How a module is compiled, and why (facts read in pytorch/TensorRT, ``py/torch_tensorrt/dynamo/``
``_compiler.py`` and ``_defaults.py`` at tags v2.10.0, v2.11.0, v2.12.1, v2.13.0 and main = 2.14.0a0):

- Precision comes from the graph's own dtypes. 2.10-2.12 take ``use_explicit_typing`` (default
  ``True`` since 2.10; 2.9 defaulted to ``False``) and raise an AssertionError when
  ``enabled_precisions`` holds anything but FP32 while it is on. 2.13.0 removed both parameters from
  ``dynamo.compile``; they fall into its ``**kwargs`` and are silently ignored (no error, an FP32
  engine for an FP32 graph). So torchprobe compiles a module that is already cast to the dtype, with
  kept-FP32 submodules cast back inside the graph (``plan.py``), passes ``use_explicit_typing=True``
  only where the signature has it (detected with ``inspect.signature``, not by version string), and
  never passes ``enabled_precisions``. 2.10-2.12 warn "`use_explicit_typing` is deprecated" on every
  call whatever is passed (they test ``kwargs.get("use_explicit_typing")``, which a named parameter
  never reaches); that one warning is filtered here.
- Unknown keyword arguments are swallowed by ``**kwargs`` in every version, so every option passed
  here is first checked against the signature (:func:`compile_options`): a missing one is an error,
  not a silently different build.
- ``min_block_size`` defaults to 5: with fewer supported ops the graph is returned with no TensorRT
  in it, with only a warning. torchprobe passes ``min_block_size=1`` and checks that a
  ``_run_on_acc*`` child exists (TensorRT engines; PyTorch fallback segments are ``_run_on_gpu*``,
  from the adjacency and hierarchical partitioners in ``partitioning/``).
- Engine caching (``cache_built_engines``/``reuse_cached_engines``) is off by default and kept off:
  its cache key ignores the typing options. The timing cache at ``timing_cache_path`` (default: one
  shared file in the temp dir) is always read and written, so each compile gets its own file.
- ``compile`` lowers the ExportedProgram it is given in place (``pre_export_lowering``), so every
  compile gets a fresh ``torch.export.export``.
- ``dryrun=True`` runs lowering and partitioning but builds no engine; the op census below uses it
  (it prints its summary to stdout, which is captured and dropped).
- ``import torch_tensorrt`` calls ``torch.cuda.get_device_capability()`` at import
  (``dynamo/lowering/passes/_aten_lowering_pass.py``, module level, 2.11-2.14.0a0), hence the lazy
  import that catches ``Exception``. Each minor pins the matching torch minor
  (``pyproject.toml``: 2.11 needs torch 2.11, 2.12 torch 2.12, 2.13 torch 2.13).
- Rule-based autocast (2.10+, used by :func:`tensorrt_snippet`): ``autocast_excluded_nodes`` are
  regexes ``re.match``-ed against a node's innermost ``nn_module_stack`` path
  (``lowering/passes/nodeclassifier.py``); the output-range rule needs
  ``autocast_calibration_dataloader`` (``pass_utils.py``), and ``autocast_low_precision_type=None``
  makes the pass a no-op (``rule_based_autocast.py``).
- Signature drift: 2.12 added ``runtime_cache_path`` and 2.13.0 removed it again (runtime
  settings); 2.13.0 added ``fallback_data_dependent_ops`` and deprecated ``use_python_runtime``;
  2.14.0 adds ``use_complex_decomposition`` and ``disabled_constant_fold_exclusions``. None is
  used here.
- Versions: 2.11 ships with TensorRT 10.15.1, 2.12 with 10.16.1, 2.13 with 11.0.0; 2.14.0 needs
  torch 2.14 and ``tensorrt-cu13 >= 11.1, < 11.2``. TensorRT 11 is strongly typed only (weak
  typing, ``BuilderFlag.FP16`` and per-layer precision are gone), which is why the module is cast.
- Engine layers (2.11-2.14): each ``_run_on_acc*`` child has ``get_layer_info()``, the engine
  inspector's JSON. Layers are named ``[TYPE]-[aten_ops.op]-[module.path/node]``
  (``conversion/converter_utils.py`` ``set_layer_name``/``get_node_name``), fused layers join names
  with ``+``. The JSON is detailed (layer types, tensor formats and dtypes) only for engines built
  while a ``torch_tensorrt.dynamo.Debugger`` is active (``_TRTInterpreter.py`` sets
  ``ProfilingVerbosity.DETAILED`` whenever a debugger config exists, 2.12+; 2.11 only with
  ``save_engine_profile``); otherwise names only. So the compile runs inside a quiet Debugger
  (``log_level="error"``, no builder monitor, a temporary ``logging_dir``) where the class exists,
  and the root logger it reconfigures (``dictConfig``) is restored afterwards.
  :attr:`CompileInfo.layers` lists the layers, and ``str(info)`` says which layers each module
  became: that is the evidence isolate's table shows.

Example (on a CUDA machine with torch-tensorrt)::

    backend = TensorRTBackend()
    layer = model.encoder.layers[3]                          # FP32, eval mode, on CUDA
    fixed = PrecisionPlan(torch.float16, frozenset({"norm2"})).apply(layer)
    compiled = backend.wrap(fixed, torch.float16, (x.half(),), {}, name="encoder.layers.3")
    y = compiled(x.half())                                   # may come back in fp16
    print(compiled.info)

The printed line has this form (illustrative numbers and layers: no TensorRT run could be recorded
on the machines this was written on)::

    tensorrt:fp16 encoder.layers.3: 3 TensorRT engines, 2 PyTorch segments, 35/37 ops in TensorRT (94.6%),
    fallback: aten.sort.default x2, built in 4.1 s, torch_tensorrt 2.14.0; layers: norm2 -> NORMALIZATION
    (FP16); ffn.0 -> MATRIX_MULTIPLY+ELEMENTWISE (FP16); ...
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import io
import json
import keyword
import logging
import operator
import os
import re
import tempfile
import time
import warnings
from types import ModuleType
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..errors import InvalidArgument, UnsupportedTarget
from ..names import ROOT
from ..tree import named_leaves
from .base import LOW_PRECISION, Backend, dtype_name

logger = logging.getLogger(__name__)

__all__ = [
    "CompileInfo",
    "EngineLayer",
    "parse_layer_info",
    "TensorRTBackend",
    "TensorRTProgram",
    "autocast_exclusion_regexes",
    "compile_options",
    "tensorrt_snippet",
]

MIN_VERSION = (2, 11)
NOT_INSTALLED = (
    "torch_tensorrt is not installed (needs a CUDA machine with TensorRT): "
    'pip install "torchprobe[tensorrt]" tensorrt on a machine with an NVIDIA GPU'
)
TRT_SEGMENT = "_run_on_acc"
TORCH_SEGMENT = "_run_on_gpu"

# Options every supported dynamo.compile takes by name (2.11 .. 2.14.0a0).
_REQUIRED_OPTIONS = (
    "arg_inputs",
    "kwarg_inputs",
    "device",
    "min_block_size",
    "cache_built_engines",
    "reuse_cached_engines",
    "timing_cache_path",
    "dryrun",
)
_DEPRECATION = r"`use_explicit_typing` is deprecated"


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine, as the engine inspector names it.

    ``types``, ``ops`` and ``modules`` are parsed from Torch-TensorRT's layer names
    (``[TYPE]-[aten_ops.op]-[module.path/node]``, several when TensorRT fused layers); ``kind`` is
    the inspector's ``LayerType`` and ``precision`` the dtype of its outputs (both only in a
    detailed inspection, else None).
    """

    name: str
    types: tuple[str, ...]
    ops: tuple[str, ...]
    modules: tuple[str, ...]
    kind: str | None = None
    precision: str | None = None


_LAYER_PART = re.compile(r"\[([A-Za-z_0-9]+)\]-\[([^\]]+)\]-\[([^\]]+)\]")
_PRECISIONS = (("FP8", "FP8"), ("INT8", "INT8"), ("BF16", "BF16"), ("BFLOAT16", "BF16"), ("FP16", "FP16"),
               ("HALF", "FP16"), ("FP32", "FP32"), ("FLOAT", "FP32"), ("INT32", "INT32"), ("INT64", "INT64"), ("BOOL", "BOOL"))


def _module_of_node_path(path: str) -> str:
    """``encoder.layers.3.norm2/native_layer_norm_scaled`` -> ``encoder.layers.3.norm2``; older
    releases wrote ``/encoder/layers/3/norm2/...``; no module path -> the root."""
    if "/" not in path:
        return ROOT
    if path.startswith("/"):
        return ".".join(path.strip("/").split("/")[:-1]) or ROOT
    return path.rsplit("/", 1)[0] or ROOT


def _precision(text: str) -> str | None:
    upper = text.upper()
    return next((name for key, name in _PRECISIONS if key in upper), None)


def parse_layer_info(text: str) -> tuple[EngineLayer, ...]:
    """The layers of an engine inspector JSON (``get_layer_info()``), names-only or detailed.

    TensorRT 10 writes ``{"Layers": [...], "Bindings": [...]}`` (TensorRT 11 renames the bindings);
    a names-only inspection lists strings, a detailed one objects with ``Name``, ``LayerType`` and
    ``Outputs[*]["Format/Datatype"]`` (TensorRT developer guide, "Engine Inspector").
    """
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return ()
    entries = data.get("Layers", []) if isinstance(data, dict) else data if isinstance(data, list) else []
    layers = []
    for entry in entries:
        if isinstance(entry, str):
            name, kind, outputs = entry, None, []
        elif isinstance(entry, dict):
            name, kind, outputs = str(entry.get("Name", "")), entry.get("LayerType"), entry.get("Outputs") or []
        else:
            continue
        parts = _LAYER_PART.findall(name)
        formats = [str(o.get("Format/Datatype", "")) for o in outputs if isinstance(o, dict)]
        precision = next((p for p in map(_precision, formats) if p), None)
        layers.append(EngineLayer(
            name=name,
            types=tuple(dict.fromkeys(t for t, _, _ in parts)),
            ops=tuple(dict.fromkeys(op.removeprefix("aten_ops.") for _, op, _ in parts)),
            modules=tuple(dict.fromkeys(_module_of_node_path(p) for _, _, p in parts)),
            kind=str(kind) if kind is not None else None,
            precision=precision,
        ))
    return tuple(layers)


def layers_by_module(layers: Sequence[EngineLayer]) -> dict[str, list[EngineLayer]]:
    """The engine layers each module became (a fused layer counts for every module it contains)."""
    found: dict[str, list[EngineLayer]] = {}
    for layer in layers:
        for module in layer.modules or (ROOT,):
            found.setdefault(module, []).append(layer)
    return found


@dataclasses.dataclass(frozen=True)
class CompileInfo:
    """What one Torch-TensorRT compile produced.

    ``trt_ops`` counts the ``call_function`` nodes of the lowered graph that the partitioner put
    into TensorRT segments (from a dry run of the same graph; ``None`` when the census is off or
    failed); ``torch_ops`` those left to PyTorch; ``fallback_ops`` names them, most frequent first.
    """

    module: str | None  # the qualified name given to wrap(name=...), None when not given
    dtype: torch.dtype
    segments: int
    fallback_segments: int
    trt_ops: int | None
    torch_ops: int
    fallback_ops: tuple[tuple[str, int], ...]
    version: str
    build_s: float
    layers: tuple[EngineLayer, ...] = ()
    layer_info: str = "none"  # "detailed", "names", or why there is none

    @property
    def trt_fraction(self) -> float | None:
        """Share of the graph's ops that ran in TensorRT (None when not counted)."""
        if self.trt_ops is None:
            return None
        total = self.trt_ops + self.torch_ops
        return self.trt_ops / total if total else None

    def __str__(self) -> str:
        where = f" {self.module}" if self.module is not None else ""
        parts = [
            f"{_plural(self.segments, 'TensorRT engine')}",
            f"{_plural(self.fallback_segments, 'PyTorch segment')}",
        ]
        if self.trt_ops is not None and self.trt_fraction is not None:
            total = self.trt_ops + self.torch_ops
            parts.append(f"{self.trt_ops}/{total} ops in TensorRT ({100 * self.trt_fraction:.1f}%)")
        else:
            parts.append(f"{self.torch_ops} ops in PyTorch")
        if self.fallback_ops:
            parts.append("fallback: " + ", ".join(f"{op} x{n}" for op, n in self.fallback_ops[:5]))
        parts.append(f"built in {self.build_s:.1f} s")
        parts.append(f"torch_tensorrt {self.version}")
        text = f"tensorrt:{dtype_name(self.dtype)}{where}: " + ", ".join(parts)
        if self.layers:
            text += "; layers: " + self.layers_text()
        return text

    def layers_text(self, limit: int = 8) -> str:
        """``module -> TYPE+TYPE (precision)`` for the first ``limit`` modules of the engines."""
        items = []
        for module, layers in layers_by_module(self.layers).items():
            types = "+".join(dict.fromkeys(t for layer in layers for t in (layer.types or (layer.kind or "?",))))
            precisions = sorted({layer.precision for layer in layers if layer.precision})
            items.append(f"{module} -> {types}" + (f" ({'/'.join(precisions)})" if precisions else ""))
        more = f"; ... {len(items) - limit} more modules" if len(items) > limit else ""
        return "; ".join(items[:limit]) + more


@dataclasses.dataclass(frozen=True)
class TensorRTProgram:
    """A compiled module: call it like the module; ``info`` says what ran where."""

    graph_module: fx.GraphModule
    info: CompileInfo

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# The backend


class TensorRTBackend(Backend):
    """Runs a module as a strongly typed Torch-TensorRT program (``torch_tensorrt.dynamo.compile``).

    ``census=True`` also counts which ops ran in TensorRT, at the cost of one more export and
    lowering per compile (a dry run; no engine is built). ``last_info`` is the
    :class:`CompileInfo` of the latest successful :meth:`wrap`.
    """

    name = "tensorrt"
    cast_weights = True
    compiles = True
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, *, census: bool = True) -> None:
        self.census = census
        self._last_info: CompileInfo | None = None

    @property
    def last_info(self) -> CompileInfo | None:
        return self._last_info

    def unavailable(self, device: torch.device | str) -> str | None:
        device = torch.device(device)
        if importlib.util.find_spec("torch_tensorrt") is None:
            return NOT_INSTALLED
        if device.type != "cuda":
            return f"backend 'tensorrt' runs on CUDA devices only; got device '{device}': pass a CUDA device such as 'cuda'"
        if not torch.cuda.is_available():
            return f"CUDA not available: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda})"
        trt, error = _import_torch_tensorrt()
        if trt is None:
            return f"torch_tensorrt is installed but does not import: {error}"
        version = _version_of(trt)
        found = _major_minor(version)
        if found is not None and found < MIN_VERSION:
            want = ".".join(map(str, MIN_VERSION))
            return f"torch_tensorrt {version} is older than {want}, the oldest version the tensorrt backend supports: pip install -U \"torchprobe[tensorrt]\""
        return None

    def wrap(
        self,
        module: nn.Module,
        dtype: torch.dtype,
        args: tuple,
        kwargs: dict[str, Any],
        *,
        name: str | None = None,
    ) -> TensorRTProgram:
        """Export ``module`` afresh and compile it with Torch-TensorRT; see the module docstring.

        ``name`` (the module's qualified name) only labels the :class:`CompileInfo`. Raises
        :class:`UnsupportedTarget` when TensorRT cannot run here, the export or compile fails, or
        no op ended up in a TensorRT engine.
        """
        args, kwargs = tuple(args), dict(kwargs or {})
        device = _device_of(module, args, kwargs)
        label = f"target 'tensorrt:{dtype_name(dtype)}'" + (f" on module {name!r}" if name is not None else "")
        reason = self.unavailable(device)
        if reason is not None:
            raise UnsupportedTarget(f"{label}: {reason}")
        trt, _ = _import_torch_tensorrt()
        assert trt is not None  # unavailable() said it imports
        version = _version_of(trt)
        compile_fn = trt.dynamo.compile

        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="torchprobe-trt-") as tmp:
            options = compile_options(compile_fn, device=device, timing_cache_path=os.path.join(tmp, "timing_cache.bin"))
            with _detailed_layers(trt, os.path.join(tmp, "debug")) as detail:
                compiled = _compile(compile_fn, module, args, kwargs, options, label, version)
            build_s = time.perf_counter() - start
            layers, layer_info = _engine_layers(compiled, detail)
            census = _census(compiled)
            if not census.trt_segments:
                ops = _top(census.torch_ops)
                raise UnsupportedTarget(
                    f"{label}: nothing ran in TensorRT: torch_tensorrt {version} left all "
                    f"{sum(census.torch_ops.values())} ops to PyTorch ({ops or 'no ops'}). "
                    "Those ops have no TensorRT converter in this version; run this module on the "
                    "'strict' target instead, or isolate a larger module"
                )
            trt_ops = None
            if self.census:
                dry_options = {**options, "dryrun": True}
                trt_ops = self._count_trt_ops(compile_fn, module, args, kwargs, dry_options, census, label, version)

        info = CompileInfo(
            module=name,
            dtype=dtype,
            segments=len(census.trt_segments),
            fallback_segments=len(census.torch_segments),
            trt_ops=trt_ops,
            torch_ops=sum(census.torch_ops.values()),
            fallback_ops=_top_items(census.torch_ops),
            version=version,
            build_s=build_s,
            layers=layers,
            layer_info=layer_info,
        )
        logger.info("%s", info)
        self._last_info = info
        return TensorRTProgram(compiled, info)

    @staticmethod
    def _count_trt_ops(
        compile_fn: Callable[..., Any],
        module: nn.Module,
        args: tuple,
        kwargs: dict[str, Any],
        options: dict[str, Any],
        real: _Census,
        label: str,
        version: str,
    ) -> int | None:
        """Ops in TensorRT segments, from a dry run (partitioned graph, no engines built)."""
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # dryrun prints its report
                dry = _census(_compile(compile_fn, module, args, kwargs, options, label, version))
        except Exception as e:  # the census is a nicety: never fail a built engine over it
            logger.warning("%s: op census (dry run) failed, TensorRT op share unknown: %s", label, e)
            return None
        if dry.trt_segments != real.trt_segments:
            logger.warning(
                "%s: dry run partitioned differently (%s vs %s); TensorRT op share unknown",
                label, list(dry.trt_segments), list(real.trt_segments),
            )
            return None
        return dry.trt_ops


def compile_options(compile_fn: Callable[..., Any], *, device: torch.device, timing_cache_path: str) -> dict[str, Any]:
    """Keyword options for ``compile_fn`` (``torch_tensorrt.dynamo.compile``), read off its signature.

    ``use_explicit_typing=True`` is added only where the parameter exists (2.10-2.12); 2.13+ is
    always strongly typed. Raises UnsupportedTarget when an option torchprobe relies on is not a
    named parameter, since ``**kwargs`` would swallow it silently.
    """
    parameters = inspect.signature(compile_fn).parameters
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [n for n in _REQUIRED_OPTIONS if n not in named]
    if missing:
        raise UnsupportedTarget(
            f"torch_tensorrt.dynamo.compile has no parameter {', '.join(missing)}; the tensorrt backend "
            "was written against torch-tensorrt 2.11-2.14: install one of those versions"
        )
    options: dict[str, Any] = {
        "device": device,
        "min_block_size": 1,
        "cache_built_engines": False,
        "reuse_cached_engines": False,
        "timing_cache_path": timing_cache_path,
        "dryrun": False,
    }
    if "use_explicit_typing" in named:
        options["use_explicit_typing"] = True
    return options


# --------------------------------------------------------------------------------------------
# The fix as Torch-TensorRT code


def autocast_exclusion_regexes(names: Sequence[str]) -> list[str]:
    """``autocast_excluded_nodes`` patterns keeping ``names`` (and everything inside them) in FP32.

    Torch-TensorRT ``re.match``-es each pattern against a node's innermost ``nn_module_stack``
    path, e.g. ``encoder.layers.3.norm2``. Each pattern matches its module and its children and
    nothing else (``layers.3`` does not match ``layers.30``). Names inside another kept name are
    dropped (already covered); the root (``"(root)"`` or ``""``) gives ``".*"``, every node.
    """
    kept = _outermost(names, "names")
    if "" in kept:
        return [".*"]
    return [rf"^{re.escape(name)}(\.|$)" for name in kept]


def tensorrt_snippet(
    keep_fp32: Sequence[str],
    dtype: torch.dtype,
    input_names_hint: Sequence[str] | str | None = None,
) -> str:
    """Python code compiling the user's model with Torch-TensorRT, ``keep_fp32`` kept in FP32.

    It defines (a) ``compile_keep_fp32``: a self-contained ``keep_fp32(model, names, dtype)``
    helper casts a copy of the model to ``dtype`` and the named submodules back to FP32 with
    boundary casts done by forward pre/post hooks (module-level functions, so the model still
    pickles), then ``torch.export`` + ``torch_tensorrt.dynamo.compile`` (any version from 2.11 on),
    and (b) ``compile_autocast``: the same modules excluded from Torch-TensorRT's own rule-based
    autocast (2.10+). It only defines things (running it needs nothing but torch-tensorrt); the
    closing comment shows the call, ``input_names_hint`` naming the model's positional inputs
    (default ``x``).
    """
    if dtype not in LOW_PRECISION:
        valid = ", ".join(f"torch.{str(d).replace('torch.', '')}" for d in LOW_PRECISION)
        raise InvalidArgument(f"tensorrt_snippet(dtype=...) takes a low-precision dtype ({valid}); got {dtype}")
    kept = _outermost(keep_fp32, "keep_fp32")
    inputs = _input_names(input_names_hint)
    dtype_expr = f"torch.{str(dtype).replace('torch.', '')}"
    regexes = autocast_exclusion_regexes(kept)
    listed = "".join(f"    {_py_str(n)},\n" for n in kept)
    keep_list = f"[\n{listed}]" if kept else "[]"
    excluded = "{\n" + "".join(f"            {_py_regex(r)},\n" for r in regexes) + "        }" if regexes else "set()"
    call_inputs = f"({inputs[0]},)" if len(inputs) == 1 else f"({', '.join(inputs)})"
    what = f"{len(kept)} module(s) in float32" if kept else "no module in float32"
    return _SNIPPET.format(
        what=what,
        dtype_name=dtype_expr.replace("torch.", ""),
        dtype=dtype_expr,
        keep_list=keep_list,
        excluded=excluded,
        call_inputs=call_inputs,
    )


_SNIPPET = '''\
# torchprobe fix for TensorRT {dtype_name}: keep {what}, the rest in {dtype_name}.
# Run on a CUDA machine with torch-tensorrt (>= 2.11) and TensorRT installed.
# `model` is your float32 nn.Module in eval mode on CUDA; the example inputs are CUDA tensors.
import copy
import functools

import torch
import torch_tensorrt

KEEP_FP32 = {keep_list}
DTYPE = {dtype}


def _cast(value, dtype):
    """Cast the floating tensors in a (nested) tuple/list/dict to dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_cast(v, dtype) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {{k: _cast(v, dtype) for k, v in value.items()}}
    return value


def _inputs_to_fp32(module, args, kwargs):
    return _cast(args, torch.float32), _cast(kwargs, torch.float32)


def _outputs_to(module, args, kwargs, output, dtype):
    return _cast(output, dtype)


def keep_fp32(model, names, dtype):
    """A copy of `model` cast to `dtype`, with the named submodules kept in float32.

    Each kept module gets a forward pre-hook casting its floating inputs to float32 and a forward
    hook casting its outputs back to `dtype` (module-level functions: the model still pickles and
    deep-copies). The casts are part of the exported graph, so a strongly typed TensorRT engine
    computes that module in float32.
    """
    model = copy.deepcopy(model).to(dtype)
    for name in names:
        module = model.get_submodule(name).float()
        module.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
        module.register_forward_hook(functools.partial(_outputs_to, dtype=dtype), with_kwargs=True)
    return model


def compile_keep_fp32(model, inputs):
    """(a) Cast the model, keep KEEP_FP32 in float32, compile strongly typed."""
    inputs = _cast(tuple(inputs), DTYPE)
    exported = torch.export.export(keep_fp32(model, KEEP_FP32, DTYPE), inputs, strict=False)
    return torch_tensorrt.dynamo.compile(
        exported,
        arg_inputs=list(inputs),
        min_block_size=1,
        # Precision follows the graph's dtypes (strong typing). torch-tensorrt 2.11-2.12 do
        # that with use_explicit_typing=True, their default; never add enabled_precisions.
        # 2.13+ are always strongly typed and no longer take either argument.
        # use_explicit_typing=True,  # 2.11-2.12 only
    )


def compile_autocast(model, inputs):
    """(b) Torch-TensorRT's rule-based autocast (2.10+) on the float32 model, same modules excluded."""
    inputs = _cast(tuple(inputs), torch.float32)
    exported = torch.export.export(model, inputs, strict=False)
    return torch_tensorrt.dynamo.compile(
        exported,
        arg_inputs=list(inputs),
        min_block_size=1,
        enable_autocast=True,
        autocast_low_precision_type={dtype},
        # re.match-ed against each node's innermost nn.Module path: a kept module and its
        # children. Without autocast_calibration_dataloader, the output-range rule
        # (autocast_max_output_threshold) does not apply: only these nodes stay float32.
        autocast_excluded_nodes={excluded},
    )


# With your model and example inputs:
#     trt_model = compile_keep_fp32(model, {call_inputs})  # or: compile_autocast(model, {call_inputs})
#     output = trt_model(*_cast({call_inputs}, DTYPE))      # compile_autocast takes float32 inputs
'''


# --------------------------------------------------------------------------------------------
# Helpers


@functools.lru_cache(maxsize=1)
def _import_torch_tensorrt() -> tuple[ModuleType | None, str | None]:
    try:
        import torch_tensorrt
    except Exception as e:  # fails without a GPU: it imports tensorrt and queries the device
        return None, f"{type(e).__name__}: {e}"
    return torch_tensorrt, None


def _version_of(trt: ModuleType) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def _major_minor(version: str) -> tuple[int, int] | None:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _device_of(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.device:
    tensors = [t for _, t in named_leaves((args, kwargs))] or [*module.parameters(), *module.buffers()]
    return tensors[0].device if tensors else torch.device("cuda")


def _compile(
    compile_fn: Callable[..., Any],
    module: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    options: dict[str, Any],
    label: str,
    version: str,
) -> fx.GraphModule:
    try:
        exported = torch.export.export(module, args, kwargs or None, strict=False)
    except Exception as e:
        raise UnsupportedTarget(f"{label}: torch.export.export(strict=False) failed, so TensorRT cannot compile it: {e}") from e
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
            return compile_fn(exported, arg_inputs=list(args), kwarg_inputs=kwargs or None, **options)
    except Exception as e:
        raise UnsupportedTarget(f"{label}: torch_tensorrt {version} dynamo.compile failed: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _detailed_layers(trt: ModuleType, logging_dir: str) -> Any:
    """A quiet ``torch_tensorrt.dynamo.Debugger`` around the build, so the engine inspector is
    detailed; yields "detailed" or why not. The root logger the Debugger reconfigures (it calls
    ``logging.config.dictConfig``) is restored afterwards."""
    debugger_cls = getattr(getattr(trt, "dynamo", None), "Debugger", None)
    if debugger_cls is None:
        yield "names (torch_tensorrt has no dynamo.Debugger)"
        return
    wanted = {"log_level": "error", "engine_builder_monitor": False, "logging_dir": logging_dir, "save_layer_info": False}
    accepted = inspect.signature(debugger_cls).parameters
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        debugger = debugger_cls(**{k: v for k, v in wanted.items() if k in accepted})
    except Exception as e:  # never fail a build over the inspection
        yield f"names (Debugger failed: {type(e).__name__}: {e})"
        return
    try:
        with debugger:
            yield "detailed"
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def _engine_layers(gm: nn.Module, detail: str) -> tuple[tuple[EngineLayer, ...], str]:
    """Layers of every TensorRT engine of a compiled graph, from its inspector JSON."""
    layers: list[EngineLayer] = []
    for name, child in gm.named_children():
        if name.startswith(TRT_SEGMENT) and hasattr(child, "get_layer_info"):
            try:
                layers.extend(parse_layer_info(child.get_layer_info()))
            except Exception as e:
                return tuple(layers), f"none (get_layer_info failed: {type(e).__name__}: {e})"
    if not layers:
        return (), "none (the engines returned no layer information)"
    named_only = all(layer.kind is None for layer in layers)
    return tuple(layers), ("names" if named_only else "detailed") if detail == "detailed" else detail


@dataclasses.dataclass(frozen=True)
class _Census:
    trt_segments: tuple[str, ...]
    torch_segments: tuple[str, ...]
    trt_ops: int | None  # None when the TensorRT segments are engines, no longer graphs
    torch_ops: collections.Counter


def _census(gm: nn.Module) -> _Census:
    """Segments and ``call_function`` ops of a partitioned graph (``operator.getitem`` is glue)."""
    trt_segments, torch_segments = [], []
    trt_ops: int | None = 0
    torch_ops: collections.Counter = collections.Counter(_ops(gm))
    for child_name, child in gm.named_children():
        if child_name.startswith(TRT_SEGMENT):
            trt_segments.append(child_name)
            if isinstance(child, fx.GraphModule) and trt_ops is not None:
                trt_ops += sum(_ops(child).values())
            else:
                trt_ops = None
        elif child_name.startswith(TORCH_SEGMENT):
            torch_segments.append(child_name)
            torch_ops.update(_ops(child))
    return _Census(tuple(trt_segments), tuple(torch_segments), trt_ops, torch_ops)


def _ops(gm: nn.Module) -> collections.Counter:
    graph = getattr(gm, "graph", None)
    if not isinstance(graph, fx.Graph):
        return collections.Counter()
    return collections.Counter(
        str(node.target) for node in graph.nodes if node.op == "call_function" and node.target is not operator.getitem
    )


def _top_items(counter: collections.Counter) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _top(counter: collections.Counter, n: int = 5) -> str:
    items = _top_items(counter)
    more = f", ... {len(items) - n} more" if len(items) > n else ""
    return ", ".join(f"{op} x{k}" for op, k in items[:n]) + more


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _outermost(names: Sequence[str], argument: str) -> list[str]:
    """Unique names in order, the root as ``""``, without names inside another listed name."""
    if isinstance(names, str):
        raise InvalidArgument(f"{argument}= takes a sequence of module names such as ['encoder.layers.3']; got the string {names!r}")
    cleaned: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgument(f"{argument}= takes module names (str) as in model.named_modules(); got {name!r}")
        name = "" if name == ROOT else name
        if name not in cleaned:
            cleaned.append(name)
    if "" in cleaned:
        return [""]
    return [n for n in cleaned if not any(n.startswith(other + ".") for other in cleaned if other != n)]


def _input_names(hint: Sequence[str] | str | None) -> list[str]:
    if hint is None:
        return ["x"]
    names = [hint] if isinstance(hint, str) else list(hint)
    bad = [n for n in names if not (isinstance(n, str) and n.isidentifier() and not keyword.iskeyword(n))]
    if bad or not names:
        raise InvalidArgument(f"input_names_hint= takes Python identifiers naming the model's positional inputs, e.g. ['images']; got {hint!r}")
    return names


def _py_str(text: str) -> str:
    """A double-quoted Python literal where the text allows it, else repr()."""
    return f'"{text}"' if text.isprintable() and '"' not in text and "\\" not in text else repr(text)


def _py_regex(pattern: str) -> str:
    """A raw-string literal for a regex where the text allows it, else repr()."""
    safe = pattern.isprintable() and '"' not in pattern and not pattern.endswith("\\")
    return f'r"{pattern}"' if safe else repr(pattern)
