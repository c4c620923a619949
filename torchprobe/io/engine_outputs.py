"""A real engine's tensors, keyed by ONNX tensor name, joined to a reference's module names.

An engine's outputs come as a Polygraphy RunResults JSON (``polygraphy run model.onnx --trt
--trt-outputs mark all --save-outputs engine.json``; read with Polygraphy's own loader), an
``.npz``, or a safetensors file, each keyed by ONNX tensor names. :func:`link_engine` pairs them
with a reference's row keys through the ONNX file's module scopes (:mod:`torchprobe.io.onnx`);
:func:`torchprobe.compare` does this when given ``onnx=``::

    cmp = tp.compare("fp32.safetensors", "engine.json", onnx="model.onnx")
    print(cmp)     # first divergence in module names; origin: introduced / inherited

prints (a tiny ConvNeXt whose deployed graph has one Conv weight scaled by 1.5, run by ONNX Runtime)::

    8 of 35 tensors diverge (rel_l2 > 0.01); first divergence: encoder.stages.1.downsampling_layer.1 (b: conv2d_3) (rel_l2 0.5)
    a: fp32.safetensors [fp32]   b: engine.json [onnxrt-runner-N0-12/01/26-22:06:52]
    matched 35 of 39 module outputs of a by name through model.onnx

      #  key                                                  shape          ...  rel_l2  ...  status    origin
     16  encoder.stages.1.downsampling_layer.0 -> permute_7   (1, 8, 8, 8)   ...  1.52e-07 ... ok
     17  encoder.stages.1.downsampling_layer.1 -> conv2d_3    (1, 16, 4, 4)  ...  0.5      ... DIVERGE   introduced
     18  encoder.stages.1.layers.0.dwconv -> conv2d_4         (1, 16, 4, 4)  ...  0.5      ... DIVERGE   inherited

    no engine tensor (4): encoder.stages.0.layers.0.drop_path, ...   (nn.Identity: no ONNX op)

This module is the only one in torchprobe that imports ``polygraphy``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import InvalidArgument, TorchprobeError
from .onnx import Origin, ScopeMatch, onnx_scopes

__all__ = ["EngineLink", "EngineOutputs", "link_engine", "load_engine_outputs"]

logger = logging.getLogger(__name__)

_FORMATS = ".json (Polygraphy --save-outputs), .npz, .safetensors"


@dataclass(frozen=True, repr=False)
class EngineOutputs:
    """Tensors of one engine run keyed by ONNX tensor name, in the file's order.

    ``runner`` is the Polygraphy runner they come from (None for .npz and safetensors files);
    ``runners`` lists every runner in the file.
    """

    path: Path
    tensors: Mapping[str, Tensor]
    runner: str | None = None
    runners: tuple[str, ...] = ()

    def __repr__(self) -> str:
        runner = f", runner={self.runner!r}" if self.runner else ""
        return f"EngineOutputs({str(self.path)!r}, {len(self.tensors)} tensors{runner})"


def load_engine_outputs(path: str | os.PathLike[str], runner: str | None = None) -> EngineOutputs:
    """Read an engine's tensors from a Polygraphy RunResults JSON, an .npz or a safetensors file.

    For a Polygraphy file, ``runner`` picks one runner by name (or a unique prefix of its name,
    such as ``trt-runner``); by default the first runner that
    is not the reference (Polygraphy compares each runner with the one before it, so the first is
    the reference): the second of several, or the only one. The first iteration is read.

        >>> out = load_engine_outputs("engine.json")
        >>> out.runner, len(out.tensors)
        ('onnxrt-runner-N0-12/01/26-22:06:52', 54)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument(f"b must be a path to the engine's outputs ({_FORMATS}); got {type(path).__name__}")
    path = Path(os.fspath(path))
    if not path.is_file():
        raise InvalidArgument(f"b={str(path)!r}: no such file; give the engine's outputs ({_FORMATS})")
    suffix = path.suffix.lower()
    if suffix != ".json" and runner is not None:
        raise InvalidArgument(f"runner={runner!r} applies to Polygraphy .json files only; {path} is a {suffix} file")
    if suffix == ".json":
        return _load_polygraphy(path, runner)
    if suffix == ".npz":
        return EngineOutputs(path, MappingProxyType(_load_npz(path)))
    if suffix == ".safetensors":
        from .dumps import load_dump  # the one module that reads safetensors

        dump = load_dump(path, require_torchprobe=False)
        return EngineOutputs(path, MappingProxyType({key: dump[key] for key in dump.order}))
    raise InvalidArgument(f"b={str(path)!r}: engine outputs must be {_FORMATS}; got a {suffix or 'suffix-less'} file")


def _load_polygraphy(path: Path, runner: str | None) -> EngineOutputs:
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError as e:
        raise TorchprobeError(
            f"reading Polygraphy results needs polygraphy ({e}); pip install 'torchprobe[polygraphy]'"
        ) from e
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):  # Polygraphy prints by default
            results = RunResults.load(str(path))
    except PolygraphyException as e:
        raise InvalidArgument(
            f"{path} is not a Polygraphy RunResults file ({_first_line(e)}); save one with "
            "polygraphy run ... --save-outputs FILE.json"
        ) from e
    except ValueError as e:  # not JSON at all
        raise InvalidArgument(f"{path} is not a Polygraphy RunResults JSON: {_first_line(e)}") from e
    runners = tuple(results.keys())
    if not runners:
        raise InvalidArgument(f"{path} holds no runner results; run polygraphy with --save-outputs again")
    if runner is None:
        runner = runners[1] if len(runners) > 1 else runners[0]
    elif runner not in runners:
        # Polygraphy names runners "<kind>-runner-N<i>-<date>-<time>": a unique prefix is enough.
        starting = [name for name in runners if name.startswith(runner)]
        if len(starting) != 1:
            why = "is not in" if not starting else f"starts {len(starting)} runner names in"
            raise InvalidArgument(f"runner={runner!r} {why} {path}; valid runners: {', '.join(map(repr, runners))}")
        runner = starting[0]
    iterations = results[runner]
    if not iterations:
        raise InvalidArgument(f"runner {runner!r} in {path} has no iterations")
    if len(iterations) > 1:
        logger.info("%s: runner %s has %d iterations; reading the first", path, runner, len(iterations))
    tensors: dict[str, Tensor] = {}
    for name, value in iterations[0].items():
        array = value.load() if hasattr(value, "load") else value
        tensors[name] = _as_tensor(array, f"{path}[{runner!r}][{name!r}]")
    logger.debug("read %d tensors of runner %s from %s (runners: %s)", len(tensors), runner, path, runners)
    return EngineOutputs(path, MappingProxyType(tensors), runner, runners)


def _load_npz(path: Path) -> dict[str, Tensor]:
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: _as_tensor(archive[name], f"{path}[{name!r}]") for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise InvalidArgument(f"{path} is not a readable .npz of arrays: {_first_line(e)}") from e


def _as_tensor(array: Any, where: str) -> Tensor:
    if isinstance(array, Tensor):
        return array.detach().to("cpu")
    import numpy as np

    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SUV":
        raise InvalidArgument(f"{where} holds {array.dtype} values, not numbers")
    return torch.from_numpy(np.ascontiguousarray(array))


# ---------------------------------------------------------------------------------- linking


@dataclass(frozen=True, repr=False)
class EngineLink:
    """An engine's outputs paired with a reference's row keys (see :func:`link_engine`).

    ``mapping``: reference row key -> ONNX tensor in the engine file, for every pair found;
    ``unmatched``: reference row key -> why it has no engine tensor (no ONNX tensor is its output,
    or the engine file lacks that tensor).
    """

    engine: EngineOutputs
    onnx: Path
    mapping: Mapping[str, str]
    unmatched: Mapping[str, str]
    match: ScopeMatch

    def origins(self, passed: Mapping[str, bool]) -> dict[str, Origin | None]:
        """Introduced/inherited per diverging row key of ``passed`` (row key -> within tol)."""
        return self.match.origins(passed)

    def __repr__(self) -> str:
        return f"EngineLink({len(self.mapping)} matched, {len(self.unmatched)} unmatched, runner={self.engine.runner!r})"


def link_engine(
    engine: str | os.PathLike[str] | EngineOutputs,
    onnx: str | os.PathLike[str],
    reference: Mapping[str, Any],
    runner: str | None = None,
) -> EngineLink:
    """Pair the tensors of ``engine`` with ``reference``'s row keys (key -> (shape, dtype)) through
    the module scopes of the ONNX file ``onnx`` the engine was built from.

    Raises TorchprobeError when the ONNX file has no scopes, and InvalidArgument when no tensor of
    the engine file is a module output of a reference row (wrong ONNX file, or an engine run that
    kept only the graph outputs of a model whose reference has none of them).
    """
    outputs = engine if isinstance(engine, EngineOutputs) else load_engine_outputs(engine, runner)
    scopes = onnx_scopes(onnx)
    match = scopes.match(reference)
    mapping: dict[str, str] = {}
    unmatched: dict[str, str] = dict(match.unmatched)
    conflicts: list[str] = []
    for key, name in match.outputs.items():
        tensor = outputs.tensors.get(name)
        if tensor is None:
            unmatched[key] = f"the engine file has no tensor {name!r}"
        elif not scopes.fits(name, tuple(tensor.shape), tensor.dtype):
            unmatched[key] = f"engine tensor {name!r} has shape {tuple(tensor.shape)}, unlike {name!r} in {scopes.path}"
            conflicts.append(name)
        else:
            mapping[key] = name
    if not mapping:
        raise InvalidArgument(f"no module outputs to compare in {_source(outputs)}: {_why_none(outputs, scopes, conflicts, reference)}")
    if conflicts:
        logger.warning(
            "%d tensors of %s differ in shape from the ONNX file's tensors of the same name (%s); "
            "was the engine built from %s?", len(conflicts), outputs.path, _few(conflicts), scopes.path,
        )
    logger.info("matched %d of %d reference tensors to %s", len(mapping), len(reference), outputs.path)
    for key, why in unmatched.items():
        logger.debug("no engine tensor for %s: %s", key, why)
    return EngineLink(outputs, scopes.path, MappingProxyType(mapping), MappingProxyType(unmatched), match)


def _source(outputs: EngineOutputs) -> str:
    return f"{outputs.path}" + (f" (runner {outputs.runner!r})" if outputs.runner else "")


def _why_none(outputs: EngineOutputs, scopes: Any, conflicts: list[str], reference: Mapping[str, Any]) -> str:
    names = list(outputs.tensors)
    known = set(scopes.values) | set(scopes.producers)
    shared = [name for name in names if name in known]
    if conflicts:
        name = conflicts[0]
        return (
            f"its tensors differ in shape from the ONNX file's (e.g. {name!r}: {tuple(outputs.tensors[name].shape)} "
            f"in the engine file, {scopes.shape_of(name)} in {scopes.path}); pass the ONNX file the engine was built from"
        )
    if not shared:
        return (
            f"none of its {len(names)} tensors ({_few(names)}) is a tensor of {scopes.path}; "
            "pass the ONNX file the engine was built from"
        )
    if set(names) <= set(scopes.graph_outputs):
        return (
            f"it holds only graph outputs ({_few(names)}); run the engine with every tensor marked as an "
            "output (polygraphy run ... --trt-outputs mark all / --onnx-outputs mark all)"
        )
    return (
        f"{len(shared)} of its {len(names)} tensors are tensors of {scopes.path}, but none is the output of a "
        f"module call in a ({len(reference)} tensors, e.g. {_few(list(reference), 3)}); "
        "do a, the ONNX file and the engine come from the same model?"
    )


def _few(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__
