"""Training-time early warning: FP16 headroom of every module's output, sampled every N steps, and
(with ``target=``) the margin of the weakest modules under a target.

Activations often grow as training goes on (more data, longer training, a learning-rate bump) until
one of them no longer fits FP16 (max 65504) and an FP16 engine or an autocast run breaks. ``Monitor``
watches the largest finite absolute value of every module's output, at a fixed cadence, and warns
while there is still room to act: when the headroom left to 65504 drops below a threshold, and
earlier, when its trend says it will reach zero within a few more samples.

Example::

    import torchprobe as tp

    with tp.Monitor(model, every=50) as mon:
        for x, y in loader:
            mon.step()                      # once per iteration, BEFORE the forward pass
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step(); opt.zero_grad()
    print(mon)
    mon.save("headroom.json")               # tp.Monitor.load("headroom.json") reads it back

``print(mon)`` after 14 steps of ``train_growing`` in ``tests/test_monitor.py`` (SGD on a small
two-branch net whose ``grow`` Linear gets its weight doubled after every step)::

    Monitor: 7 modules, 14 samples (every 1 step), warn below 2 bits of FP16 headroom
    module      step     absmax    headroom (bits)    trend (bits/sample)    NaN/Inf
    --------  ------  ---------  -----------------  ---------------------  ---------
    grow          13  2.187e+04               1.58                  -1.00          0
    (root)        13  2.145e+04               1.61                  -1.88          0
    head          13  2.145e+04               1.61                  -1.88          0
    act           13  1.672e+04               1.97                  -1.00          0
    stem          13      2.149              14.90                   0.00          0
    side          13      1.421              15.49                   0.00          0
    side_act      13      1.421              15.49                   0.00          0

Read it top down: ``grow`` loses one bit of headroom per sample and is 1.6 bits from overflow; what
depends on it (``act``, ``head``, the model output) follows; ``stem`` and the side branch are flat.
By then ``HeadroomTrendWarning`` (at step 11 for ``grow``: "reaches 0 bits around step 15") and
``LowHeadroomWarning`` have fired for those four modules. The fix is to keep ``grow`` in FP32
(``torch.autocast(enabled=False)`` around it, or ``tp.bisect``'s plan); ``tp.report(model, inputs)``
shows whether the FP16 targets already diverge there.

Margins under a target
    Headroom sees a module's *output*; a LayerNorm that an ONNX -> TensorRT engine decomposes breaks
    when its centred *input* passes 256, long before any output nears 65504. With
    ``target="strict:fp16"`` (say), every ``margin_every`` samples the monitor also measures
    :func:`torchprobe.margin` on that step's own inputs, just before the forward runs: at the first
    such sample over every monitored leaf module, then over the ``margin_modules`` weakest of them.
    It warns (``LowMarginWarning``) when a margin falls below ``min_margin`` and
    (``MarginTrendWarning``), earlier, when ``log2(margin)`` is trending to 0: "at this rate
    'encoder.layer.0.output.LayerNorm' breaks under strict:fp16 around step 12000". The margin is
    measured on private copies in eval mode (dropout off); the model is never changed.

Cost: hooks exist only during sampled steps (``step % every == 0``); between samples the model runs
with no torchprobe code at all. During a sample each module output is reduced to a statistics vector
on its own device (:class:`torchprobe.stats.Summarizer`) and nothing is copied to the host until the
sample is finalized (at the next ``step()``, ``close()`` or when ``history`` is read), where all
vectors move in one transfer per device. A margin sample costs a few dozen replays of each measured
module plus two copies of the model.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as _distributed
from .io.atomic import write_text
from .capture import Call, module_calls
from .errors import InvalidArgument, UnsupportedTarget
from .formats import FP16_MAX
from .formats import headroom_bits as _headroom_bits
from .io.jsonable import float_from_json, json_float
from .localize.margin import DEFAULT_MIN_FACTOR, Margins, margins_of
from .names import ROOT, module_names, name_filter
from .progress import quiet
from .stats import Summarizer, SlabRow, TensorStats, to_host
from .stats import read as read_stats
from .targets import get_backend, model_device, parse_target
from .tree import named_leaves

__all__ = [
    "Monitor",
    "MonitorHistory",
    "ModuleHistory",
    "MarginHistory",
    "MarginPoint",
    "Sample",
    "GradStats",
    "HeadroomWarning",
    "LowHeadroomWarning",
    "HeadroomTrendWarning",
    "MarginWarning",
    "LowMarginWarning",
    "MarginTrendWarning",
]

_FORMAT = "torchprobe.monitor"
_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Warnings


class HeadroomWarning(UserWarning):
    """Base of the warnings ``Monitor`` issues; filter this class to silence or escalate all of them.

    Attributes name what was seen: ``module``, ``step``, ``absmax``, ``headroom`` (bits) and ``kind``.
    """

    kind = "headroom"

    def __init__(self, message: str, *, module: str, step: int, absmax: float, headroom: float) -> None:
        super().__init__(message)
        self.module = module
        self.step = step
        self.absmax = absmax
        self.headroom = headroom


class LowHeadroomWarning(HeadroomWarning):
    """A module's output came within ``headroom_bits`` of the FP16 max, or held NaN/Inf."""

    kind = "low-headroom"


class HeadroomTrendWarning(HeadroomWarning):
    """A module's headroom falls steadily and extrapolates to 0 bits within ``trend_window`` samples."""

    kind = "trend"


class MarginWarning(HeadroomWarning):
    """A margin warning: ``factor`` (how much the module's inputs may grow before it breaks under
    ``target``); ``headroom`` is ``log2(factor)``, ``absmax`` is NaN (not a statistic of the output)."""

    kind = "margin"

    def __init__(self, message: str, *, module: str, step: int, factor: float, target: str) -> None:
        super().__init__(message, module=module, step=step, absmax=math.nan, headroom=math.log2(factor))
        self.factor = factor
        self.target = target


class LowMarginWarning(MarginWarning):
    """A module's margin under the target fell below ``min_margin``."""

    kind = "low-margin"


class MarginTrendWarning(MarginWarning):
    """A module's margin shrinks steadily and extrapolates to x1 (it breaks) within
    ``trend_window`` more margin samples."""

    kind = "margin-trend"


# --------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class GradStats:
    """Statistics of the gradient flowing into one module's output during one sampled step.

    ``tiny`` counts non-zero finite values below 2**-24 (the smallest FP16 subnormal): they flush to
    zero in FP16, so a large ``tiny_fraction`` under loss scaling means the scale is too small.
    ``zeros`` counts exact zeros (already flushed, or masked by e.g. ReLU). Counts are summed over the
    module's output tensors and calls in the step; ``absmax`` is over finite values.
    """

    absmax: float
    tiny: int
    zeros: int
    nonfinite: int
    numel: int

    @property
    def tiny_fraction(self) -> float:
        return self.tiny / self.numel if self.numel else 0.0

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class Sample:
    """One module at one sampled step: the largest finite |value| of its output and NaN/Inf count.

    Over several output tensors and several calls in the step: ``absmax`` is the max, ``nonfinite``
    the sum. ``headroom_bits`` = log2(65504 / absmax) (``inf`` for an all-zero output); ``grad`` is
    set only with ``Monitor(grads=True)`` and when the output required grad and got one.
    """

    step: int
    absmax: float
    nonfinite: int
    headroom_bits: float
    grad: GradStats | None = None


@dataclass(frozen=True)
class ModuleHistory:
    """Every sample of one module, in step order."""

    module: str
    samples: tuple[Sample, ...] = ()

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(s.step for s in self.samples)

    @property
    def absmax(self) -> tuple[float, ...]:
        return tuple(s.absmax for s in self.samples)

    @property
    def headroom(self) -> tuple[float, ...]:
        return tuple(s.headroom_bits for s in self.samples)

    @property
    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def min_headroom(self) -> float:
        """Least headroom seen in any sample (``inf`` when never sampled)."""
        return min(self.headroom, default=math.inf)

    def trend(self, window: int) -> float | None:
        """Least-squares slope of headroom (bits per step) over the last ``window`` samples."""
        return _slope(self.steps[-window:], self.headroom[-window:]) if window >= 2 else None

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class MarginPoint:
    """One margin sample of one module: the factor its inputs may grow by before it breaks."""

    step: int
    factor: float
    reason: str | None = None

    @property
    def bits(self) -> float:
        return math.log2(self.factor)


@dataclass(frozen=True)
class MarginHistory:
    """Every margin sample of one module under the monitor's target, in step order."""

    module: str
    points: tuple[MarginPoint, ...] = ()

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(p.step for p in self.points)

    @property
    def factors(self) -> tuple[float, ...]:
        return tuple(p.factor for p in self.points)

    @property
    def last(self) -> MarginPoint | None:
        return self.points[-1] if self.points else None

    def trend(self, window: int) -> float | None:
        """Least-squares slope of ``log2(factor)`` (bits per step) over the last ``window`` points."""
        return _slope(self.steps[-window:], [p.bits for p in self.points[-window:]]) if window >= 2 else None

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True)
class MonitorHistory:
    """What a ``Monitor`` saw: one ``ModuleHistory`` per monitored module, in ``named_modules()`` order.

    ``hist["encoder.layers.0"]`` gives a module's history, ``hist.least_headroom(5)`` the five
    modules closest to FP16 overflow at their latest sample, ``hist.unvisited()`` monitored modules
    that never produced a floating output in a sampled step. With a target, ``hist.margins`` holds
    the margin samples (``hist.margin("name")``). ``str(hist)`` is a short table.
    """

    modules: tuple[ModuleHistory, ...]
    every: int
    headroom_bits: float
    trend_window: int
    grads: bool = False
    target: str | None = None
    margin_every: int | None = None
    min_margin: float | None = None
    margins: tuple[MarginHistory, ...] = ()
    _index: dict[str, ModuleHistory] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {m.module: m for m in self.modules})

    def __getitem__(self, name: str) -> ModuleHistory:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no monitored module named {name!r}; monitored: {_preview(self.names)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[ModuleHistory]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.module for m in self.modules)

    @property
    def steps(self) -> tuple[int, ...]:
        """Every step at which at least one module was sampled, ascending."""
        return tuple(sorted({s.step for m in self.modules for s in m.samples}))

    def unvisited(self) -> tuple[str, ...]:
        return tuple(m.module for m in self.modules if not m.samples)

    def least_headroom(self, n: int | None = None) -> list[ModuleHistory]:
        """Sampled modules ordered by their latest sample: NaN/Inf first, then least headroom."""
        ranked = sorted((m for m in self.modules if m.samples), key=_rank_key)
        return ranked if n is None else ranked[:n]

    def margin(self, name: str) -> MarginHistory:
        for m in self.margins:
            if m.module == name:
                return m
        raise KeyError(f"no margin samples of {name!r}; measured: {_preview([m.module for m in self.margins])}")

    def least_margin(self) -> list[MarginHistory]:
        """Modules with margin samples, smallest latest factor first."""
        return sorted((m for m in self.margins if m.points), key=lambda m: (m.last.factor, m.module))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": _FORMAT,
            "version": _VERSION,
            "every": self.every,
            "headroom_bits": self.headroom_bits,
            "trend_window": self.trend_window,
            "grads": self.grads,
            "modules": [_module_to_dict(m) for m in self.modules],
        }
        if self.target is not None:
            out["margin"] = {
                "target": self.target, "every": self.margin_every, "min_margin": self.min_margin,
                "modules": [{"module": m.module, "step": list(m.steps), "factor": [json_float(f) for f in m.factors],
                             "reason": [p.reason for p in m.points]} for m in self.margins],
            }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorHistory:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InvalidArgument(f"expected a torchprobe monitor history (format {_FORMAT!r}); got "
                                  f"format {data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        if data.get("version") != _VERSION:
            raise InvalidArgument(f"monitor history version {data.get('version')!r} is not supported; "
                                  f"this torchprobe reads version {_VERSION}")
        margin = data.get("margin") or {}
        return cls(
            modules=tuple(_module_from_dict(m) for m in data["modules"]),
            every=int(data["every"]),
            headroom_bits=float(data["headroom_bits"]),
            trend_window=int(data["trend_window"]),
            grads=bool(data.get("grads", False)),
            target=margin.get("target"),
            margin_every=margin.get("every"),
            min_margin=margin.get("min_margin"),
            margins=tuple(MarginHistory(str(m["module"]), tuple(
                MarginPoint(int(s), float_from_json(f), r) for s, f, r in zip(m["step"], m["factor"], m["reason"])))
                for m in margin.get("modules", ())),
        )

    def __str__(self) -> str:
        from .render.monitor import monitor_text

        return monitor_text(self)


# --------------------------------------------------------------------------------------------------
# The monitor


@dataclass
class _Acc:
    """Host-side running values of one module in the step being sampled."""

    absmax: float = 0.0
    nonfinite: int = 0
    grad: _GradAcc | None = None


@dataclass
class _GradAcc:
    absmax: float = 0.0
    tiny: int = 0
    zeros: int = 0
    nonfinite: int = 0
    numel: int = 0


class _Pending(NamedTuple):
    """One output tensor (or its gradient) summarized on its device, not yet on the host."""

    index: int
    is_grad: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    summary: Tensor | SlabRow
    nonzero: Tensor | None  # gradients only: count_nonzero, for the exact-zero count


@dataclass
class _Sampling:
    """The step being sampled: its hooks, device-side summaries not yet on the host, host sums."""

    step: int
    margin: bool = False  # this sample also measures margins
    hooks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    pending: list[_Pending] = field(default_factory=list)
    host: dict[int, _Acc] = field(default_factory=dict)
    open: bool = True
    margins: Margins | None = None


class Monitor:
    """Sample FP16 headroom of every module's output (and gradient) every ``every`` training steps.

    Args:
        model: the module to watch. It is never modified: no dtype, device, flag or attribute change;
            forward hooks exist only while a sampled step runs.
        every: sample the steps whose index (0, 1, 2, ... counted by ``step()``) is a multiple of it.
        include, exclude: fnmatch globs (case-sensitive) over qualified names from ``named_modules()``;
            the model itself is ``"(root)"``. ``None`` means every module / none excluded.
        headroom_bits: warn when a module's output is within this many bits of 65504, i.e.
            ``absmax > 65504 / 2**headroom_bits``, or holds NaN/Inf.
        grads: also record gradient statistics of module outputs (``GradStats``) through tensor
            hooks, which survive in-place ops after the module (``nn.ReLU(inplace=True)``).
        trend_window: number of latest samples of a module fitted by least squares for the trend
            warnings, which fire when the fit reaches 0 (bits of headroom, or of margin) within as
            many more samples.
        target: a target such as ``"strict:fp16"``: also measure the margin of the weakest modules
            under it (see the module docstring). ``None`` (default): headroom only.
        margin_every: measure margins at every ``margin_every``-th sample (default 10).
        margin_modules: how many of the weakest modules the later margin samples follow (default 3).
        min_margin: warn when a margin falls below this factor (default 2: less than one doubling).
        margin_tol: the local-error tolerance of the margin (default per dtype, as ``tp.margin``).

    Call ``step()`` once per training iteration, **before** that iteration's forward pass: it
    finalizes the previous sample (one host transfer, warnings) and installs hooks if the new step is
    sampled. A sampled step's forward and backward both count towards it. Use it as a context manager
    or call ``close()``, which finalizes and removes every hook, also when the body raises.

    Warnings are ``LowHeadroomWarning``, ``HeadroomTrendWarning``, ``LowMarginWarning`` and
    ``MarginTrendWarning`` (all ``HeadroomWarning``, a ``UserWarning``), at most one per module
    per kind, issued when a sample is finalized.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 100,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        headroom_bits: float = 2.0,
        grads: bool = False,
        trend_window: int = 5,
        *,
        target: str | None = None,
        margin_every: int = 10,
        margin_modules: int = 3,
        min_margin: float = DEFAULT_MIN_FACTOR,
        margin_tol: float | None = None,
        group: Any = None,
        rank: int | None = 0,
    ) -> None:
        # torch.distributed: each sample is merged over ``group`` (default: the world; False: this
        # rank) when it is finalized, at step()/close(), which every rank must call alike; warnings
        # and save() happen on rank ``rank`` only (None: every rank).
        self._group = _distributed.resolve_group(group)
        self._writer = _distributed.is_writer(rank, self._group)
        if not isinstance(model, nn.Module):
            raise InvalidArgument(f"model= must be a torch.nn.Module; got {type(model).__name__}")
        _check_count("every", every, 1, "sample one step in every N")
        _check_count("trend_window", trend_window, 2, "samples fitted for the trend")
        if isinstance(headroom_bits, bool) or not isinstance(headroom_bits, (int, float)) or not 0 <= headroom_bits < math.inf:
            raise InvalidArgument(f"headroom_bits= must be a finite number >= 0 (warn when absmax > 65504 / 2**headroom_bits; "
                                  f"the default 2.0 warns above 16376); got {headroom_bits!r}")
        keep = name_filter(include, exclude)
        named = [(n.name, m) for m, n in module_names(model).items()]
        watched = [(name, module) for name, module in named if keep(name)]
        if not watched:
            raise InvalidArgument(f"include={include!r} / exclude={exclude!r} leave no module to monitor; "
                                  f"module names are: {_preview([n for n, _ in named])}")
        self._model = model
        self._names = [name for name, _ in watched]
        self._index = {name: i for i, name in enumerate(self._names)}
        self._containers = [any(True for _ in module.children()) for _, module in watched]
        self.every = every
        self.headroom_bits = float(headroom_bits)
        self.grads = bool(grads)
        self.trend_window = trend_window
        self.target: str | None = None
        if target is not None:
            parsed = parse_target(target)
            if parsed.is_reference:
                raise InvalidArgument(f"target={target!r} is the FP32 reference; give a low-precision target such as 'strict:fp16'")
            reason = get_backend(parsed.backend).unavailable(model_device(model))
            if reason:
                raise UnsupportedTarget(f"target {parsed} cannot run here: {reason}")
            self.target = str(parsed)
            _check_count("margin_every", margin_every, 1, "measure margins at one sample in every N")
            _check_count("margin_modules", margin_modules, 1, "how many of the weakest modules to follow")
            if isinstance(min_margin, bool) or not isinstance(min_margin, (int, float)) or not 1 <= min_margin < math.inf:
                raise InvalidArgument(f"min_margin= must be a finite number >= 1 (warn when a module's inputs may grow "
                                      f"less than this factor before it breaks); got {min_margin!r}")
        self.margin_every = margin_every
        self.margin_modules = margin_modules
        self.min_margin = float(min_margin)
        self.margin_tol = margin_tol
        self._margin_names: list[str] | None = None  # None: the next margin sample scans every leaf
        self._margins: dict[str, list[MarginPoint]] = {}
        self._summarize = Summarizer()
        self._step = -1
        self._sample_count = 0
        self._sampling: _Sampling | None = None
        self._samples: list[list[Sample]] = [[] for _ in self._names]
        self._warned: set[tuple[str, str]] = set()  # (module, warning kind)
        self._closed = False

    # -- the training-loop API ---------------------------------------------------------------------

    def step(self) -> bool:
        """Begin the next training step (call before its forward). Returns True when it is sampled."""
        if self._closed:
            raise RuntimeError("Monitor.step() after close(): this monitor is finished; create a new Monitor "
                               "to keep watching (its history stays readable)")
        self._finish(warn=True, stacklevel=3)
        self._step += 1
        if self._step % self.every == 0:
            self._start(self._step)
        return self.sampling

    def close(self) -> None:
        """Finalize the step being sampled and remove every hook. Safe to call more than once."""
        self._close(warn=True, stacklevel=3)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # While an exception propagates, record but do not warn: a warnings filter set to "error"
        # must not replace the original exception.
        self._close(warn=exc_type is None, stacklevel=3)

    @property
    def step_index(self) -> int:
        """Index of the current step (-1 before the first ``step()``)."""
        return self._step

    @property
    def sampling(self) -> bool:
        """True while the current step is being sampled (hooks installed)."""
        return self._sampling is not None and self._sampling.open

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def modules(self) -> tuple[str, ...]:
        """Qualified names of the monitored modules."""
        return tuple(self._names)

    @property
    def history(self) -> MonitorHistory:
        """Every sample so far. Values of a step still being sampled are included and may still grow
        (its backward may not have run yet); they are final after the next ``step()`` or ``close()``."""
        self._flush()
        samples = [list(s) for s in self._samples]
        if self._sampling is not None:
            for index, acc in self._sampling.host.items():
                samples[index].append(_sample(self._sampling.step, acc))
        return MonitorHistory(
            modules=tuple(ModuleHistory(name, tuple(s)) for name, s in zip(self._names, samples)),
            every=self.every,
            headroom_bits=self.headroom_bits,
            trend_window=self.trend_window,
            grads=self.grads,
            target=self.target,
            margin_every=self.margin_every if self.target else None,
            min_margin=self.min_margin if self.target else None,
            margins=tuple(MarginHistory(name, tuple(points)) for name, points in self._margins.items()),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``history`` as JSON, atomically (a temporary file in the same folder, then replace)."""
        if not self._writer:
            return
        write_text(path, json.dumps(self.history.to_dict(), allow_nan=False, separators=(",", ":")) + "\n")

    @staticmethod
    def load(path: str | os.PathLike[str]) -> MonitorHistory:
        """Read a history written by ``save``."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f, parse_constant=_reject_constant)
            except ValueError as e:
                raise InvalidArgument(f"path={path!r} is not a JSON monitor history written by Monitor.save: {e}") from e
        try:
            return MonitorHistory.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidArgument):
                raise InvalidArgument(f"path={path!r}: {e}") from e
            raise InvalidArgument(f"path={path!r} is a damaged monitor history ({type(e).__name__}: {e})") from e

    def __str__(self) -> str:
        return str(self.history)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        target = f", target={self.target!r}" if self.target else ""
        return (f"Monitor({len(self._names)} modules, every={self.every}, headroom_bits={self.headroom_bits}, "
                f"grads={self.grads}{target}, {state})")

    # -- sampling ------------------------------------------------------------------------------------

    def _start(self, step: int) -> None:
        margin = self.target is not None and self._sample_count % self.margin_every == 0
        self._sample_count += 1
        sampling = _Sampling(step, margin)
        keep = (lambda n: n in self._index or n == ROOT) if margin else (lambda n: n in self._index)
        try:
            sampling.hooks.enter_context(module_calls(
                self._model, keep, before=self._margin_hook(sampling) if margin else None,
                after=self._output_hook(sampling), per_module=True))
        except BaseException:
            sampling.hooks.close()
            raise
        self._sampling = sampling

    def _output_hook(self, sampling: _Sampling):
        summarize, grads = self._summarize, self.grads

        def after(call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            index = self._index.get(call.name)
            if not sampling.open or index is None:
                return
            for _, leaf in named_leaves(output):
                if not _measurable(leaf):
                    continue
                if type(leaf) is not Tensor:  # DTensor and co.: this rank's values (a DTensor's numel is global)
                    leaf = _distributed.local_view(leaf)[0]
                sampling.pending.append(_Pending(index, False, leaf.dtype, tuple(leaf.shape), summarize(leaf), None))
                if grads and leaf.requires_grad:
                    sampling.hooks.enter_context(leaf.register_hook(self._grad_hook(index, sampling)))

        return after

    def _grad_hook(self, index: int, sampling: _Sampling):
        summarize = self._summarize

        def hook(grad: Tensor) -> None:
            if sampling.open and _measurable(grad):
                g = grad.detach()
                sampling.pending.append(_Pending(index, True, g.dtype, tuple(g.shape), summarize(g),
                                                 torch.count_nonzero(g).reshape(1)))
            return None

        return hook

    def _margin_hook(self, sampling: _Sampling):
        """Before the sampled step's forward: the margins of the model as it is, on its own inputs."""

        def before(call: Call, module: nn.Module, args: tuple, kwargs: dict) -> None:
            if call.name != ROOT or not sampling.open or sampling.margins is not None:
                return
            with quiet():  # margin()'s copies of the model drop these hooks: nothing records twice
                sampling.margins = margins_of(module, args, kwargs, self.target, modules=self._margin_candidates(),
                                              tol=self.margin_tol)

        return before

    def _margin_candidates(self) -> list[str]:
        if self._margin_names is not None:
            return self._margin_names
        leaves = [n for n, container in zip(self._names, self._containers) if not container]
        return leaves or list(self._names)

    def _flush(self) -> None:
        """Move the summaries of the step being sampled to the host: one transfer per device."""
        sampling = self._sampling
        if sampling is None or not sampling.pending:
            return
        pending, sampling.pending = sampling.pending, []
        stats = read_stats([(p.dtype, p.shape, p.summary) for p in pending])
        grads = [i for i, p in enumerate(pending) if p.nonzero is not None]
        nonzero = dict(zip(grads, to_host([pending[i].nonzero for i in grads])))
        for i, (p, s) in enumerate(zip(pending, stats)):
            acc = sampling.host.setdefault(p.index, _Acc())
            if not p.is_grad:
                acc.absmax = max(acc.absmax, s.absmax)
                acc.nonfinite += s.nonfinite
            else:
                _add_grad(acc, s, int(nonzero[i][0]))

    def _finish(self, *, warn: bool, stacklevel: int) -> None:
        """Finalize the step being sampled: host transfer, hooks removed (always), warnings."""
        sampling = self._sampling
        if sampling is None:
            return
        try:
            self._flush()
        finally:
            sampling.open = False
            self._sampling = None
            sampling.hooks.close()
        if self._group is not None:
            sampling.host = _distributed.merge_monitor(sampling.host, len(self._names), self._group, _Acc, _GradAcc)
        for index, acc in sampling.host.items():
            self._samples[index].append(_sample(sampling.step, acc))
        measured = self._record_margins(sampling)
        if warn:
            indices = sorted(sampling.host)
            falling = self._falling(indices)
            for index in indices:
                self._check(index, falling.get(index), stacklevel + 1)
            for name in measured:
                self._check_margin(name, stacklevel + 1)

    def _record_margins(self, sampling: _Sampling) -> list[str]:
        mg = sampling.margins
        if mg is None:
            return []
        if self._margin_names is None:
            self._margin_names = [m.module for m in mg.rows[: self.margin_modules]]
        for m in mg.rows:
            self._margins.setdefault(m.module, []).append(
                MarginPoint(sampling.step, m.factor, None if m.reason is None else str(m.reason)))
        return [m.module for m in mg.rows]

    def _close(self, *, warn: bool, stacklevel: int) -> None:
        try:
            self._finish(warn=warn, stacklevel=stacklevel + 1)
        finally:
            self._closed = True

    # -- warnings ----------------------------------------------------------------------------------

    def _check(self, index: int, falling: tuple[int, float] | None, stacklevel: int) -> None:
        """Warn about module ``index``'s latest sample, at most once per kind."""
        name = self._names[index]
        samples = self._samples[index]
        last = samples[-1]
        attrs = {"module": name, "step": last.step, "absmax": last.absmax, "headroom": last.headroom_bits}
        if falling is not None:
            at, slope = falling
            self._warn(HeadroomTrendWarning, stacklevel, attrs,
                       f"{name!r}: FP16 headroom falls {-slope * self.every:.2f} bits per sample over steps "
                       f"{samples[-self.trend_window].step}..{last.step} and is {last.headroom_bits:.2f} bits at step "
                       f"{last.step} (absmax {last.absmax:.4g}); at this rate it reaches 0 bits (overflow past "
                       f"65504) around step {at}. {self._advice(index)}")
        if (name, LowHeadroomWarning.kind) in self._warned:
            return
        threshold = FP16_MAX / 2.0**self.headroom_bits
        if last.nonfinite:
            self._warn(LowHeadroomWarning, stacklevel, attrs,
                       f"{name!r}: output held {last.nonfinite} NaN/Inf values at step {last.step} (absmax of the "
                       f"finite values {last.absmax:.4g}, {last.headroom_bits:.2f} bits of FP16 headroom). "
                       f"{self._advice(index)}")
        elif last.absmax > threshold:
            self._warn(LowHeadroomWarning, stacklevel, attrs,
                       f"{name!r}: output absmax {last.absmax:.4g} at step {last.step} leaves "
                       f"{last.headroom_bits:.2f} bits of FP16 headroom, below headroom_bits={self.headroom_bits:g} "
                       f"(absmax > {threshold:.6g}). {self._advice(index)}")

    def _advice(self, index: int) -> str:
        name = self._names[index]
        if self._containers[index]:
            return (f"{name!r} contains other modules: the innermost module that warns is the one to keep in FP32; "
                    f"tp.report(model, inputs, targets=('strict:fp16',)) ranks the culprits.")
        return (f"Keep {name!r} in FP32 for FP16 runs (a torch.autocast(enabled=False) region, or the plan "
                f"tp.bisect finds) and check it with tp.report(model, inputs, targets=('strict:fp16',)).")

    def _falling(self, indices: Sequence[int]) -> dict[int, tuple[int, float]]:
        """Modules whose headroom, fitted by least squares over their last ``trend_window`` samples,
        falls and reaches 0 bits within ``trend_window`` more samples: index -> (step it reaches 0,
        slope in bits per step). One vectorized fit for all modules of the sample."""
        w = self.trend_window
        rows = [i for i in indices
                if len(self._samples[i]) >= w and (self._names[i], HeadroomTrendWarning.kind) not in self._warned]
        if not rows:
            return {}
        x = np.array([[s.step for s in self._samples[i][-w:]] for i in rows], dtype=np.float64)
        h = np.array([[s.headroom_bits for s in self._samples[i][-w:]] for i in rows], dtype=np.float64)
        hits = _reaching_zero(x, h, w * self.every)
        return {rows[k]: hit for k, hit in enumerate(hits) if hit is not None}

    def _check_margin(self, name: str, stacklevel: int) -> None:
        """Warn about the latest margin of ``name``: trending to x1, or below ``min_margin``."""
        points = self._margins[name]
        last = points[-1]
        attrs = {"module": name, "step": last.step, "factor": last.factor, "target": self.target}
        w = self.trend_window
        spacing = self.every * self.margin_every
        recent = points[-w:]
        if len(recent) == w and (name, MarginTrendWarning.kind) not in self._warned:
            x = np.array([[p.step for p in recent]], dtype=np.float64)
            y = np.array([[p.bits for p in recent]], dtype=np.float64)
            hit = _reaching_zero(x, y, w * spacing)[0]
            if hit is not None:
                at, slope = hit
                self._warn(MarginTrendWarning, stacklevel, attrs,
                           f"{name!r}: its margin under {self.target} shrinks from x{recent[0].factor:.3g} at step "
                           f"{recent[0].step} to x{last.factor:.3g} at step {last.step} ({2 ** (slope * spacing):.3g}x "
                           f"per margin sample); at this rate {name} breaks under {self.target} around step {at}. "
                           f"{self._margin_advice(name)}")
        if last.factor < self.min_margin:
            self._warn(LowMarginWarning, stacklevel, attrs,
                       f"{name!r}: margin x{last.factor:.3g} under {self.target} at step {last.step}: its inputs may "
                       f"grow only {last.factor:.3g}x before it breaks ({last.reason}), below "
                       f"min_margin={self.min_margin:g}. {self._margin_advice(name)}")

    def _margin_advice(self, name: str) -> str:
        return (f"Keep {name!r} in FP32 under {self.target} (tp.bisect finds the plan); tp.margin(model, inputs, "
                f"target={self.target!r}) lists every module's margin.")

    def _warn(self, category: type[HeadroomWarning], stacklevel: int, attrs: dict[str, Any], message: str) -> None:
        name = attrs["module"]
        if (name, category.kind) in self._warned:
            return
        self._warned.add((name, category.kind))
        if self._writer:
            warnings.warn(category(message, **attrs), stacklevel=stacklevel + 1)


# --------------------------------------------------------------------------------------------------
# Helpers


def _check_count(argument: str, value: Any, least: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidArgument(f"{argument}= must be an int >= {least} ({meaning}); got {value!r}")


def _measurable(x: Tensor) -> bool:
    """A dense floating tensor with values (integer, bool, complex, sparse and meta tensors are not)."""
    return x.is_floating_point() and x.layout is torch.strided and not x.is_meta and x.numel() > 0


def _add_grad(acc: _Acc, s: TensorStats, nonzero: int) -> None:
    g = acc.grad = acc.grad or _GradAcc()
    g.absmax = max(g.absmax, s.absmax)
    g.tiny += s.flush_fp16  # non-zero values below 2**-24
    g.zeros += s.numel - nonzero  # count_nonzero counts NaN/Inf as non-zero
    g.nonfinite += s.nonfinite
    g.numel += s.numel


def _sample(step: int, acc: _Acc) -> Sample:
    g = acc.grad
    grad = None if g is None else GradStats(absmax=g.absmax, tiny=g.tiny, zeros=g.zeros, nonfinite=g.nonfinite, numel=g.numel)
    return Sample(step=step, absmax=float(acc.absmax), nonfinite=int(acc.nonfinite),
                  headroom_bits=_headroom_bits(float(acc.absmax)), grad=grad)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope of each row of ``y`` over the same row of ``x``, and the fitted last value."""
    dx = x - x.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (dx * (y - y.mean(axis=1, keepdims=True))).sum(axis=1) / (dx * dx).sum(axis=1)
    return slope, y.mean(axis=1) + slope * dx[:, -1]


def _slope(steps: Sequence[int], values: Sequence[float]) -> float | None:
    """Least-squares slope of ``values`` over ``steps`` (None: too few or non-finite points)."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return None
    slope, _ = _fit(np.array([steps], dtype=np.float64), np.array([values], dtype=np.float64))
    return float(slope[0]) if math.isfinite(slope[0]) else None


def _reaching_zero(x: np.ndarray, y: np.ndarray, horizon: float) -> list[tuple[int, float] | None]:
    """Per row: (step at which the fitted line reaches 0, slope) when it falls and gets there within
    ``horizon`` steps after the row's last step; None otherwise (or when a value is not finite)."""
    finite = np.isfinite(y).all(axis=1)  # an all-zero output (inf headroom) has no trend
    y = np.where(np.isfinite(y), y, 0.0)
    slope, fitted_last = _fit(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps_left = fitted_last / -slope
    hit = finite & (slope < 0) & (steps_left <= horizon)
    return [(int(x[k, -1]) + max(0, math.ceil(steps_left[k])), float(slope[k])) if hit[k] else None
            for k in range(len(y))]


def _preview(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _rank_key(m: ModuleHistory) -> tuple[int, float, str]:
    last = m.samples[-1]
    return (0 if last.nonfinite else 1, last.headroom_bits, m.module)


# -- JSON -----------------------------------------------------------------------------------------


def _module_to_dict(m: ModuleHistory) -> dict[str, Any]:
    s = m.samples
    out: dict[str, Any] = {
        "module": m.module,
        "step": [x.step for x in s],
        "absmax": [json_float(x.absmax) for x in s],
        "nonfinite": [x.nonfinite for x in s],
        "headroom_bits": [json_float(x.headroom_bits) for x in s],
    }
    if any(x.grad is not None for x in s):
        out["grad"] = [None if x.grad is None else
                       {"absmax": json_float(x.grad.absmax), "tiny": x.grad.tiny, "zeros": x.grad.zeros,
                        "nonfinite": x.grad.nonfinite, "numel": x.grad.numel} for x in s]
    return out


def _module_from_dict(d: dict[str, Any]) -> ModuleHistory:
    n = len(d["step"])
    grads = d.get("grad") or [None] * n
    columns = (d["absmax"], d["nonfinite"], d["headroom_bits"], grads)
    if any(len(c) != n for c in columns):
        raise ValueError(f"module {d['module']!r} has columns of different lengths")
    dec = float_from_json
    samples = tuple(
        Sample(step=int(step), absmax=dec(a), nonfinite=int(nf), headroom_bits=dec(h),
               grad=None if g is None else GradStats(absmax=dec(g["absmax"]), tiny=int(g["tiny"]), zeros=int(g["zeros"]),
                                                     nonfinite=int(g["nonfinite"]), numel=int(g["numel"])))
        for step, a, nf, h, g in zip(d["step"], *columns)
    )
    return ModuleHistory(str(d["module"]), samples)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")
