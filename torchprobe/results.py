"""Typed, frozen results: per-module errors, verdicts, culprits, reports, isolations and fixes.

Results only hold and query what was measured; ``__str__`` renders them lazily through
:mod:`torchprobe.render`, and ``to_json`` writes through :mod:`torchprobe.atomic`.

    >>> rep = tp.report(model, x, targets=("strict:fp16",))
    >>> bool(rep), rep.culprits[0].module, rep.culprits[0].reason
    (False, 'encoder.layers.1.norm2', <Reason.OVERFLOW: 'overflow'>)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .io.atomic import write_text
from .distributed import is_writer
from .capture import Row
from .errors import DumpError
from .io.jsonable import float_from_json, json_float
from .kinds import ErrorKind, FixOutcome, Reason
from .metrics import ErrorMetrics, get_metric, worst_of
from .names import CallKey, is_within
from .stats import TensorStats


# -- report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendEvent:
    """What a backend saw inside a module: ``op`` produced ``count`` Inf/NaN from finite inputs."""

    op: str
    what: str
    count: int
    input_absmax: float
    dtype: str
    reason: Reason = Reason.OVERFLOW
    text: str = ""  # the backend's own sentence, e.g. "layer_norm: (x-mean)^2 overflowed FP16 (...)"


@dataclass(frozen=True)
class ModuleError:
    """Error of one output leaf of one module call under one target.

    ``kind`` is :class:`ErrorKind` ``LOCAL`` (the module alone, fed the reference's exact inputs) or
    ``PROPAGATED`` (the whole model under the target, this module's output vs the reference).
    ``failure`` holds the full error message when the module could not run under the target.
    """

    key: str
    module: str
    call: int
    target: str
    kind: ErrorKind
    metrics: ErrorMetrics | None
    stats: TensorStats | None
    failure: str | None = None
    events: tuple[BackendEvent, ...] = ()

    @property
    def call_key(self) -> str:
        return str(CallKey(self.module, self.call))


@dataclass(frozen=True)
class TargetOutcome:
    """The verdict for one target: the final output's error against the reference."""

    target: str
    tol: float
    output_error: ErrorMetrics | None
    passed: bool
    failure: str | None = None
    per_module_propagated: bool = True


@dataclass(frozen=True)
class Culprit:
    """A module that introduces the error under a target, the reason, and the evidence.

    In ``Report.latent`` the same type describes a module broken inside a target whose final
    output is still within tolerance; ``masked_by`` then names where the error falls back under
    tolerance, when that is visible.
    """

    module: str
    key: str
    target: str
    reason: Reason
    evidence: str
    local_error: float
    propagated_error: float | None
    module_type: str = ""
    masked_by: str | None = None

    def __str__(self) -> str:
        return f"{self.module} [{self.target}] {self.reason}: {self.evidence}"


@dataclass(frozen=True)
class CallError:
    """The worst output leaf of one module call under one target and kind (:meth:`Report.call_errors`).

    ``value`` is the worst value of the report's metric over the call's output leaves (``inf`` when a
    leaf has no metrics, ``None`` when the call failed); ``metrics`` the worst leaf's metrics (None
    when failed or a leaf has none); ``nan``/``inf`` count NaN/Inf in the target's output, all leaves.
    """

    call_key: str
    module: str
    call: int
    target: str
    kind: ErrorKind
    value: float | None
    metrics: ErrorMetrics | None
    failure: str | None
    nan: int
    inf: int
    leaves: int


@dataclass(frozen=True)
class InputStats:
    """Reference statistics of one input leaf of one module call."""

    key: str
    stats: TensorStats


@dataclass(frozen=True)
class Report:
    """Everything report() measured. ``print(rep)`` shows the verdict first.

    ``bool(rep)`` is False when the reference itself is not finite or any target diverges.
    ``latent`` lists findings under targets that pass: broken inside, masked downstream.
    """

    model: str
    reference: str
    metric: str
    targets: tuple[str, ...]
    rows: tuple[Row, ...]
    inputs: tuple[InputStats, ...]
    errors: tuple[ModuleError, ...]
    outcomes: tuple[TargetOutcome, ...]
    culprits: tuple[Culprit, ...]
    latent: tuple[Culprit, ...] = ()
    reference_finite: bool = True
    replay_failures: tuple[str, ...] = ()
    margins: dict[str, dict[str, float]] | None = None  # report(margins=True): target -> module -> factor

    def __bool__(self) -> bool:
        return self.reference_finite and all(o.passed for o in self.outcomes)

    def outcome(self, target: str) -> TargetOutcome:
        for o in self.outcomes:
            if o.target == target:
                return o
        raise KeyError(f"no target {target!r}; report has {', '.join(self.targets)}")

    def error(self, key: str, target: str, kind: str = "local") -> ModuleError | None:
        for e in self.errors:
            if e.key == key and e.target == target and e.kind == kind:
                return e
        return None

    def call_errors(self) -> tuple[CallError, ...]:
        """Per (module call, target, kind) the worst output leaf, in call order.

        Calls come in the order the reference returned them (then any seen only in ``errors``),
        each with its targets in ``targets`` order, local before propagated.

            >>> [(c.call_key, c.target, str(c.kind), c.value) for c in rep.call_errors()][:2]
            [('proj', 'eager:fp16', 'local', inf), ('proj', 'eager:fp16', 'propagated', inf)]
        """
        m = get_metric(self.metric)
        order: dict[str, int] = {}
        for r in self.rows:
            order.setdefault(str(CallKey(r.module, r.call)), len(order))
        groups: dict[tuple[str, str, ErrorKind], list[ModuleError]] = {}
        for e in self.errors:
            key = e.call_key
            order.setdefault(key, len(order))
            groups.setdefault((key, e.target, ErrorKind(e.kind)), []).append(e)
        targets = {t: i for i, t in enumerate(self.targets)}
        kinds = {ErrorKind.LOCAL: 0, ErrorKind.PROPAGATED: 1}
        out = []
        for (key, target, kind), errs in sorted(groups.items(), key=lambda kv: (
                order[kv[0][0]], targets.get(kv[0][1], len(targets)), kinds[kv[0][2]])):
            failure = next((e.failure for e in errs if e.failure), None)
            leaf_metrics = [e.metrics for e in errs]
            value = None if failure else m.worst(math.inf if x is None else x[m.name] for x in leaf_metrics)
            worst = None if failure else worst_of(m, leaf_metrics)
            out.append(CallError(key, errs[0].module, errs[0].call, target, kind, value, worst, failure,
                                 sum(e.stats.nan or 0 for e in errs if e.stats), sum(e.stats.inf or 0 for e in errs if e.stats),
                                 len(errs)))
        return tuple(out)

    def culprits_for(self, target: str) -> list[Culprit]:
        return [c for c in self.culprits if c.target == target]

    def latent_for(self, target: str) -> list[Culprit]:
        return [c for c in self.latent if c.target == target]

    def failing(self, target: str) -> bool:
        return not self.outcome(target).passed

    @property
    def exit_code(self) -> int:
        """0 when everything is within tolerance, 1 otherwise (like ``diff``)."""
        return 0 if self else 1

    def __str__(self) -> str:
        from .render.text import report_text

        return report_text(self)

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path, rank: int | None = 0) -> Path:
        """Write the report as JSON (atomically); read it back with :meth:`from_json`. Under
        torch.distributed only rank ``rank`` writes (None: every rank); the others return the path."""
        if not is_writer(rank):
            return Path(path)
        data = {"format": "torchprobe-report", "version": 2, **self.to_dict()}
        if self.margins is not None:
            data["margins"] = {t: {k: json_float(v) for k, v in m.items()} for t, m in self.margins.items()}
        return write_text(path, json.dumps(data, indent=1, default=str))

    @classmethod
    def from_json(cls, path: str | Path) -> "Report":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DumpError(f"{path}: cannot read a torchprobe report: {e}") from e
        if not isinstance(data, dict) or data.get("format") != "torchprobe-report":
            raise DumpError(f"{path}: not a torchprobe report (written by Report.to_json)")
        return _report_from_dict(data)

    def to_html(self, path: str | Path, rank: int | None = 0) -> Path:
        """Write the report as one HTML page (atomically); under torch.distributed on rank ``rank`` only."""
        from .render.html import write_report_html

        if not is_writer(rank):
            return Path(path)
        return write_report_html(self, path)


def _stats(d: dict | None, cls: type = TensorStats) -> Any:
    if d is None:
        return None
    d = dict(d)
    d["shape"] = tuple(d["shape"])
    return cls(**d)


def _metrics(d: dict | None) -> ErrorMetrics | None:
    return None if d is None else ErrorMetrics(**d)


def _culprit(d: dict) -> Culprit:
    return Culprit(**{**d, "reason": Reason(d["reason"])})


def _error(d: dict) -> ModuleError:
    events = tuple(BackendEvent(**{**ev, "reason": Reason(ev["reason"])}) for ev in d.get("events", ()))
    return ModuleError(**{**d, "kind": ErrorKind(d["kind"]), "metrics": _metrics(d["metrics"]),
                          "stats": _stats(d["stats"]), "events": events})


def _report_from_dict(d: dict[str, Any]) -> Report:
    return Report(
        model=d["model"],
        reference=d["reference"],
        metric=d["metric"],
        targets=tuple(d["targets"]),
        rows=tuple(_stats(r, Row) for r in d["rows"]),
        inputs=tuple(InputStats(i["key"], _stats(i["stats"])) for i in d["inputs"]),
        errors=tuple(_error(e) for e in d["errors"]),
        outcomes=tuple(TargetOutcome(**{**o, "output_error": _metrics(o["output_error"])}) for o in d["outcomes"]),
        culprits=tuple(_culprit(c) for c in d["culprits"]),
        latent=tuple(_culprit(c) for c in d.get("latent", ())),
        reference_finite=d.get("reference_finite", True),
        replay_failures=tuple(d.get("replay_failures", ())),
        margins=None if d.get("margins") is None else
        {t: {k: float_from_json(v) for k, v in m.items()} for t, m in d["margins"].items()},
    )


# -- isolate -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class IsolatedModule:
    """Local error of one module call run alone under the target on its reference inputs."""

    module: str
    key: str
    module_type: str
    depth: int
    error: float
    metrics: ErrorMetrics | None
    failure: str | None = None
    compiled: bool = False
    backend_info: str | None = None  # tensorrt: how much of the module ran in TensorRT


@dataclass(frozen=True)
class Isolation:
    """Per-module local errors under one target, in module names."""

    target: str
    metric: str
    tol: float
    rows: tuple[IsolatedModule, ...]
    compilations: int
    reference_passes: int

    def above_tol(self) -> list[IsolatedModule]:
        m = get_metric(self.metric)
        return [r for r in self.rows if r.failure or not m.passes(r.error, self.tol)]

    @property
    def culprits(self) -> list[IsolatedModule]:
        """Modules above tolerance none of whose measured descendants is above tolerance."""
        bad = self.above_tol()
        names = {r.module for r in bad}
        return [r for r in bad if not any(o != r.module and is_within(o, r.module) for o in names)]

    def __getitem__(self, key: str) -> IsolatedModule:
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(f"module call {key!r} was not isolated; isolated: {', '.join(r.key for r in self.rows[:8])} ...")

    def __str__(self) -> str:
        from .render.text import isolation_text

        return isolation_text(self)


# -- bisect ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchStep:
    """One full-model evaluation: the kept set, the measured final error, pass or fail."""

    keep_fp32: tuple[str, ...]
    error: float
    passed: bool
    note: str = ""
    failure: str | None = None


@dataclass(frozen=True)
class RuleComparison:
    """What the threshold rule of TensorRT/ModelOpt autocast would keep, and whether it works."""

    threshold: float
    keep_fp32: tuple[str, ...]
    error: float
    passed: bool


@dataclass(frozen=True, kw_only=True)
class Fix:
    """A keep-FP32 set for a target, measured end to end. ``bool(fix)`` is True when it meets tol."""

    target: str
    metric: str
    tol: float
    keep_fp32: tuple[str, ...]
    error_before: float
    error_after: float
    evaluations: int
    compilations: int
    candidates: tuple[str, ...]
    log: tuple[SearchStep, ...]
    verified: bool
    outcome: FixOutcome
    rule: RuleComparison | None = None
    bound: int = 0
    detail: str = ""

    def __bool__(self) -> bool:
        return self.verified and get_metric(self.metric).passes(self.error_after, self.tol)

    @property
    def message(self) -> str:
        from .render.text import fix_message

        return fix_message(self)

    @property
    def plan(self):
        from .targets import parse_target
        from .targets.plan import PrecisionPlan

        return PrecisionPlan(parse_target(self.target).dtype, frozenset(self.keep_fp32))

    def apply(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` running this fix (``model`` itself is untouched).

        For cast backends the copy has target-dtype weights with kept modules in FP32 (feed it
        target-dtype inputs); for autocast it stays FP32 with autocast-disabled regions.
        """
        from .targets import get_backend, model_device, parse_target

        backend = get_backend(parse_target(self.target).backend)
        return self.plan.apply(model, cast_weights=backend.cast_weights, autocast_device=model_device(model).type)

    def snippet(self, target: str | None = None) -> str:
        """Code to paste: Torch-TensorRT settings (``tensorrt``/``strict``) or autocast regions."""
        from .render.snippets import fix_snippet

        return fix_snippet(self, target)

    def __str__(self) -> str:
        from .render.text import fix_text

        return fix_text(self)


