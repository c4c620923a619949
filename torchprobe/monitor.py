"""Training-time early warning: FP16 headroom of every module's output, sampled every N steps.

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

Cost: hooks exist only during sampled steps (``step % every == 0``); between samples the model runs
with no torchprobe code at all. During a sample each module output costs a handful of small
reductions on its own device and nothing is copied to the host until the sample is finalized (at the
next ``step()``, ``close()`` or when ``history`` is read), where all values move in one transfer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tabulate import tabulate
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from . import distributed as _distributed
from .atomic import write_text
from .errors import InvalidArgument
from .names import name_filter
from .formats import FP16_MAX, FP16_MIN_SUBNORMAL
from .formats import headroom_bits as _headroom_bits

__all__ = [
    "Monitor",
    "MonitorHistory",
    "ModuleHistory",
    "Sample",
    "GradStats",
    "HeadroomWarning",
    "LowHeadroomWarning",
    "HeadroomTrendWarning",
]

ROOT = "(root)"
_FORMAT = "torchprobe.monitor"
_VERSION = 1
_TABLE_ROWS = 10


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
        return _slope(self.samples[-window:]) if window >= 2 else None

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class MonitorHistory:
    """What a ``Monitor`` saw: one ``ModuleHistory`` per monitored module, in ``named_modules()`` order.

    ``hist["encoder.layers.0"]`` gives a module's history, ``hist.least_headroom(5)`` the five
    modules closest to FP16 overflow at their latest sample, ``hist.unvisited()`` monitored modules
    that never produced a floating output in a sampled step. ``str(hist)`` is a short table.
    """

    modules: tuple[ModuleHistory, ...]
    every: int
    headroom_bits: float
    trend_window: int
    grads: bool = False
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "every": self.every,
            "headroom_bits": self.headroom_bits,
            "trend_window": self.trend_window,
            "grads": self.grads,
            "modules": [_module_to_dict(m) for m in self.modules],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorHistory:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InvalidArgument(f"expected a torchprobe monitor history (format {_FORMAT!r}); got "
                                  f"format {data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        if data.get("version") != _VERSION:
            raise InvalidArgument(f"monitor history version {data.get('version')!r} is not supported; "
                                  f"this torchprobe reads version {_VERSION}")
        return cls(
            modules=tuple(_module_from_dict(m) for m in data["modules"]),
            every=int(data["every"]),
            headroom_bits=float(data["headroom_bits"]),
            trend_window=int(data["trend_window"]),
            grads=bool(data.get("grads", False)),
        )

    def __str__(self) -> str:
        return _render(self)


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


class _Record(NamedTuple):
    """Statistics of one output tensor (or of its gradient) as 0-dim device tensors."""

    index: int
    is_grad: bool
    numel: int
    values: tuple[Tensor, ...]  # see _output_stats / _grad_stats


@dataclass
class _Sampling:
    """The step being sampled: its hook handles, device-side records not yet on the host, host sums."""

    step: int
    hooks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    records: list[_Record] = field(default_factory=list)  # device-side, not yet on the host
    host: dict[int, _Acc] = field(default_factory=dict)
    open: bool = True


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
            warning, which fires when the fitted headroom reaches 0 bits within as many more samples.

    Call ``step()`` once per training iteration, **before** that iteration's forward pass: it
    finalizes the previous sample (one host transfer, warnings) and installs hooks if the new step is
    sampled. A sampled step's forward and backward both count towards it. Use it as a context manager
    or call ``close()``, which finalizes and removes every hook, also when the body raises.

    Warnings are ``LowHeadroomWarning`` and ``HeadroomTrendWarning`` (both ``HeadroomWarning``,
    a ``UserWarning``), at most one per module per kind, issued when a sample is finalized.
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
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidArgument(f"every= must be a positive int (sample one step in every N); got {every!r}")
        if isinstance(trend_window, bool) or not isinstance(trend_window, int) or trend_window < 2:
            raise InvalidArgument(f"trend_window= must be an int >= 2 (samples fitted for the trend); got {trend_window!r}")
        if isinstance(headroom_bits, bool) or not isinstance(headroom_bits, (int, float)) or not 0 <= headroom_bits < math.inf:
            raise InvalidArgument(f"headroom_bits= must be a finite number >= 0 (warn when absmax > 65504 / 2**headroom_bits; "
                                  f"the default 2.0 warns above 16376); got {headroom_bits!r}")
        keep = name_filter(include, exclude)
        named = [(name or ROOT, module) for name, module in model.named_modules()]
        self._targets = [(name, module) for name, module in named if keep(name)]
        if not self._targets:
            raise InvalidArgument(f"include={include!r} / exclude={exclude!r} leave no module to monitor; "
                                  f"module names are: {_preview([n for n, _ in named])}")
        self._containers = [any(True for _ in module.children()) for _, module in self._targets]
        self.every = every
        self.headroom_bits = float(headroom_bits)
        self.grads = bool(grads)
        self.trend_window = trend_window
        self._step = -1
        self._sampling: _Sampling | None = None
        self._samples: list[list[Sample]] = [[] for _ in self._targets]
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
        return tuple(name for name, _ in self._targets)

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
            modules=tuple(ModuleHistory(name, tuple(s)) for (name, _), s in zip(self._targets, samples)),
            every=self.every,
            headroom_bits=self.headroom_bits,
            trend_window=self.trend_window,
            grads=self.grads,
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
        return (f"Monitor({len(self._targets)} modules, every={self.every}, headroom_bits={self.headroom_bits}, "
                f"grads={self.grads}, {state})")

    # -- sampling ------------------------------------------------------------------------------------

    def _start(self, step: int) -> None:
        sampling = _Sampling(step)
        try:
            for index, (_, module) in enumerate(self._targets):
                sampling.hooks.enter_context(module.register_forward_hook(self._forward_hook(index, sampling)))
        except BaseException:
            sampling.hooks.close()
            raise
        self._sampling = sampling

    def _forward_hook(self, index: int, sampling: _Sampling):
        grads = self.grads

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not sampling.open:
                return
            for leaf in _tensor_leaves(output):
                if not _measurable(leaf):
                    continue
                if type(leaf) is not Tensor:  # DTensor and co.: this rank's values (a DTensor's numel is global)
                    leaf = _distributed.local_view(leaf)[0]
                sampling.records.append(_Record(index, False, leaf.numel(), _output_stats(leaf.detach())))
                if grads and leaf.requires_grad:
                    sampling.hooks.enter_context(leaf.register_hook(_grad_hook(index, sampling)))

        return hook

    def _flush(self) -> None:
        """Move the device-side records of the step being sampled to the host, in one transfer."""
        sampling = self._sampling
        if sampling is None or not sampling.records:
            return
        records, sampling.records = sampling.records, []
        values = iter(_to_host([v for r in records for v in r.values]))
        for r in records:
            acc = sampling.host.setdefault(r.index, _Acc())
            if not r.is_grad:
                absmax, neg_nonfinite = next(values), next(values)
                acc.absmax = max(acc.absmax, absmax)
                acc.nonfinite += round(-neg_nonfinite)
            else:
                absmax, neg_nonfinite, nonzero, at_least_tiny = (next(values) for _ in range(4))
                nonfinite, nonzero = round(-neg_nonfinite), round(nonzero)
                g = acc.grad = acc.grad or _GradAcc()
                g.absmax = max(g.absmax, absmax)
                g.tiny += nonzero - round(at_least_tiny)
                g.zeros += r.numel - nonzero - nonfinite
                g.nonfinite += nonfinite
                g.numel += r.numel

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
            sampling.host = _distributed.merge_monitor(sampling.host, len(self._targets), self._group, _Acc, _GradAcc)
        for index, acc in sampling.host.items():
            self._samples[index].append(_sample(sampling.step, acc))
        if warn:
            indices = sorted(sampling.host)
            falling = self._falling(indices)
            for index in indices:
                self._check(index, falling.get(index), stacklevel + 1)

    def _close(self, *, warn: bool, stacklevel: int) -> None:
        try:
            self._finish(warn=warn, stacklevel=stacklevel + 1)
        finally:
            self._closed = True

    # -- warnings ----------------------------------------------------------------------------------

    def _check(self, index: int, falling: tuple[int, float] | None, stacklevel: int) -> None:
        """Warn about module ``index``'s latest sample, at most once per kind."""
        name = self._targets[index][0]
        samples = self._samples[index]
        last = samples[-1]
        if falling is not None:
            at, slope = falling
            self._warn(HeadroomTrendWarning, index, last, stacklevel,
                       f"{name!r}: FP16 headroom falls {-slope * self.every:.2f} bits per sample over steps "
                       f"{samples[-self.trend_window].step}..{last.step} and is {last.headroom_bits:.2f} bits at step "
                       f"{last.step} (absmax {last.absmax:.4g}); at this rate it reaches 0 bits (overflow past "
                       f"65504) around step {at}. {self._advice(index)}")
        if (name, LowHeadroomWarning.kind) in self._warned:
            return
        threshold = FP16_MAX / 2.0**self.headroom_bits
        if last.nonfinite:
            self._warn(LowHeadroomWarning, index, last, stacklevel,
                       f"{name!r}: output held {last.nonfinite} NaN/Inf values at step {last.step} (absmax of the "
                       f"finite values {last.absmax:.4g}, {last.headroom_bits:.2f} bits of FP16 headroom). "
                       f"{self._advice(index)}")
        elif last.absmax > threshold:
            self._warn(LowHeadroomWarning, index, last, stacklevel,
                       f"{name!r}: output absmax {last.absmax:.4g} at step {last.step} leaves "
                       f"{last.headroom_bits:.2f} bits of FP16 headroom, below headroom_bits={self.headroom_bits:g} "
                       f"(absmax > {threshold:.6g}). {self._advice(index)}")

    def _advice(self, index: int) -> str:
        name = self._targets[index][0]
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
                if len(self._samples[i]) >= w and (self._targets[i][0], HeadroomTrendWarning.kind) not in self._warned]
        if not rows:
            return {}
        x = np.array([[s.step for s in self._samples[i][-w:]] for i in rows], dtype=np.float64)
        h = np.array([[s.headroom_bits for s in self._samples[i][-w:]] for i in rows], dtype=np.float64)
        finite = np.isfinite(h).all(axis=1)  # an all-zero output (inf headroom) has no trend
        h[~np.isfinite(h)] = 0.0
        dx = x - x.mean(axis=1, keepdims=True)  # steps are distinct, so no row is all zero
        slope = (dx * (h - h.mean(axis=1, keepdims=True))).sum(axis=1) / (dx * dx).sum(axis=1)
        fitted_last = h.mean(axis=1) + slope * dx[:, -1]
        with np.errstate(divide="ignore", invalid="ignore"):
            steps_left = fitted_last / -slope
        hit = finite & (slope < 0) & (steps_left <= w * self.every)
        return {rows[k]: (int(x[k, -1]) + max(0, math.ceil(steps_left[k])), float(slope[k])) for k in np.flatnonzero(hit)}

    def _warn(self, category: type[HeadroomWarning], index: int, sample: Sample, stacklevel: int, message: str) -> None:
        name = self._targets[index][0]
        if (name, category.kind) in self._warned:
            return
        self._warned.add((name, category.kind))
        if self._writer:
            warnings.warn(category(message, module=name, step=sample.step, absmax=sample.absmax,
                                   headroom=sample.headroom_bits), stacklevel=stacklevel + 1)


# --------------------------------------------------------------------------------------------------
# Helpers


# The statistics avoid comparison kernels (bool outputs are slow on CPU): |x| with NaN/Inf replaced
# by -1 gives the finite absmax (a max of -1 means no finite value) and, clamped to <= 0 and summed,
# minus the NaN/Inf count. Counts are summed in float32: exact up to 2**24 per tensor.


def _tensor_leaves(obj: Any) -> Iterator[Tensor]:
    """Tensors in a module output: any pytree (tuple, list, dict, namedtuple, registered nodes such as
    transformers' ModelOutput), and plain dataclasses that pytree does not know, walked by field."""
    if isinstance(obj, Tensor):
        yield obj
        return
    for leaf in pytree.tree_flatten(obj)[0]:
        if isinstance(leaf, Tensor):
            yield leaf
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            for f in dataclasses.fields(leaf):
                yield from _tensor_leaves(getattr(leaf, f.name))


def _measurable(x: Any) -> bool:
    """A dense floating tensor with values (integer, bool, complex, sparse and meta tensors are not)."""
    return isinstance(x, Tensor) and x.is_floating_point() and x.layout is torch.strided and not x.is_meta and x.numel() > 0


def _abs(t: Tensor) -> Tensor:
    return (t.float() if t.element_size() == 1 else t).abs()  # float8 has no nan_to_num: go through float32


def _output_stats(t: Tensor) -> tuple[Tensor, Tensor]:
    """(absmax over finite values, -count of NaN/Inf) of ``t``, on its device, 5 kernels."""
    a = _abs(t).nan_to_num_(nan=-1.0, posinf=-1.0)
    absmax = a.amax()
    return absmax, a.clamp_(max=0.0).sum(dtype=torch.float32)


def _grad_stats(g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(absmax over finite values, -count of NaN/Inf, count of non-zero finite, count of |g| >= 2**-24)."""
    a = _abs(g).nan_to_num_(nan=-1.0, posinf=-1.0)
    absmax = a.amax()
    neg_nonfinite = a.clamp(max=0.0).sum(dtype=torch.float32)
    a.clamp_(min=0.0)  # NaN/Inf now count as zeros here; _flush subtracts them again
    nonzero = a.sign().sum(dtype=torch.float32)
    # |g| * 2**24 is exact (or inf); its floor is 0 exactly for |g| < 2**-24, the values FP16 flushes
    at_least_tiny = a.mul_(1.0 / FP16_MIN_SUBNORMAL).floor_().clamp_(max=1.0).sum(dtype=torch.float32)
    return absmax, neg_nonfinite, nonzero, at_least_tiny


def _grad_hook(index: int, sampling: _Sampling):
    def hook(grad: Tensor) -> None:
        if sampling.open and _measurable(grad):
            sampling.records.append(_Record(index, True, grad.numel(), _grad_stats(grad.detach())))
        return None

    return hook


def _to_host(tensors: list[Tensor]) -> list[float]:
    """Stack 0-dim device tensors per device (dtype promoted) and copy each stack to the host once."""
    if not tensors:
        return []
    out: list[float] = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([tensors[i] for i in idx]).cpu().tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


def _sample(step: int, acc: _Acc) -> Sample:
    g = acc.grad
    grad = None if g is None else GradStats(absmax=g.absmax, tiny=g.tiny, zeros=g.zeros, nonfinite=g.nonfinite, numel=g.numel)
    return Sample(step=step, absmax=float(acc.absmax), nonfinite=int(acc.nonfinite),
                  headroom_bits=_headroom_bits(float(acc.absmax)), grad=grad)


def _slope(samples: Sequence[Sample]) -> float | None:
    """Least-squares slope of headroom over step, in bits per step (None: too few or non-finite points)."""
    if len(samples) < 2:
        return None
    xs = [float(s.step) for s in samples]
    ys = [s.headroom_bits for s in samples]
    if not all(math.isfinite(y) for y in ys):
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def _preview(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _rank_key(m: ModuleHistory) -> tuple[int, float, str]:
    last = m.samples[-1]
    return (0 if last.nonfinite else 1, last.headroom_bits, m.module)


def _render(hist: MonitorHistory) -> str:
    ranked = hist.least_headroom()
    unit = "step" if hist.every == 1 else "steps"
    head = (f"Monitor: {len(hist)} modules, {len(hist.steps)} samples (every {hist.every} {unit}), "
            f"warn below {hist.headroom_bits:g} bits of FP16 headroom")
    if not ranked:
        return head + "\n(no samples yet: call step() before each forward pass)"
    headers = ["module", "step", "absmax", "headroom (bits)", "trend (bits/sample)", "NaN/Inf"]
    if hist.grads:
        headers += ["grad absmax", "grad < 2^-24", "grad zeros"]
    rows = []
    for m in ranked[:_TABLE_ROWS]:
        last = m.samples[-1]
        slope = m.trend(hist.trend_window)
        row = [m.module, last.step, f"{last.absmax:.4g}", f"{last.headroom_bits:.2f}",
               "" if slope is None else f"{round(slope * hist.every, 2) + 0.0:.2f}", last.nonfinite]
        if hist.grads:
            g = last.grad
            row += ["", "", ""] if g is None else [f"{g.absmax:.3g}", f"{g.tiny_fraction:.1%}", f"{g.zero_fraction:.1%}"]
        rows.append(row)
    more = len(ranked) - _TABLE_ROWS
    tail = f"\n... {more} more modules with more headroom" if more > 0 else ""
    return head + "\n" + tabulate(rows, headers=headers, disable_numparse=True,
                                         colalign=("left",) + ("right",) * (len(headers) - 1)) + tail


# -- JSON -----------------------------------------------------------------------------------------


def _enc(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # 'inf', '-inf', 'nan': strict JSON has no such numbers


def _dec(x: float | str) -> float:
    return float(x)


def _module_to_dict(m: ModuleHistory) -> dict[str, Any]:
    s = m.samples
    out: dict[str, Any] = {
        "module": m.module,
        "step": [x.step for x in s],
        "absmax": [_enc(x.absmax) for x in s],
        "nonfinite": [x.nonfinite for x in s],
        "headroom_bits": [_enc(x.headroom_bits) for x in s],
    }
    if any(x.grad is not None for x in s):
        out["grad"] = [None if x.grad is None else
                       {"absmax": _enc(x.grad.absmax), "tiny": x.grad.tiny, "zeros": x.grad.zeros,
                        "nonfinite": x.grad.nonfinite, "numel": x.grad.numel} for x in s]
    return out


def _module_from_dict(d: dict[str, Any]) -> ModuleHistory:
    n = len(d["step"])
    grads = d.get("grad") or [None] * n
    columns = (d["absmax"], d["nonfinite"], d["headroom_bits"], grads)
    if any(len(c) != n for c in columns):
        raise ValueError(f"module {d['module']!r} has columns of different lengths")
    samples = tuple(
        Sample(step=int(step), absmax=_dec(a), nonfinite=int(nf), headroom_bits=_dec(h),
               grad=None if g is None else GradStats(absmax=_dec(g["absmax"]), tiny=int(g["tiny"]), zeros=int(g["zeros"]),
                                                     nonfinite=int(g["nonfinite"]), numel=int(g["numel"])))
        for step, a, nf, h, g in zip(d["step"], *columns)
    )
    return ModuleHistory(str(d["module"]), samples)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")
