"""Typed, frozen results of report(): per-module errors, per-target outcomes, culprits."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .capture import Row
from .errors import DumpError
from .metrics import ErrorMetrics, within, worse
from .stats import TensorStats
from .atomic import write_text


@dataclass(frozen=True)
class ModuleError:
    """Error of one output leaf of one module call under one target.

    ``kind`` is ``"local"`` (the module alone, fed the reference's exact inputs) or
    ``"propagated"`` (the whole model under the target, this module's output vs the reference).
    ``failure`` holds the error message when the module could not run under the target.
    """

    key: str
    module: str
    call: int
    target: str
    kind: str
    metrics: ErrorMetrics | None
    stats: TensorStats | None
    failure: str | None = None
    evidence: tuple[str, ...] = ()


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
    """A module that introduces the error under a target, the reason, and the evidence."""

    module: str
    key: str
    target: str
    reason: str
    evidence: str
    local_error: float
    propagated_error: float | None
    module_type: str = ""

    def __str__(self) -> str:
        return f"{self.module} [{self.target}] {self.reason}: {self.evidence}"


@dataclass(frozen=True)
class InputStats:
    """Reference statistics of one input leaf of one module call."""

    key: str
    stats: TensorStats


@dataclass(frozen=True)
class Report:
    """Everything report() measured. ``print(rep)`` shows the verdict first."""

    model: str
    reference: str
    metric: str
    targets: tuple[str, ...]
    rows: tuple[Row, ...]
    inputs: tuple[InputStats, ...]
    errors: tuple[ModuleError, ...]
    outcomes: tuple[TargetOutcome, ...]
    culprits: tuple[Culprit, ...]
    peak_note: str = ""

    def __bool__(self) -> bool:
        return all(o.passed for o in self.outcomes)

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

    def culprits_for(self, target: str) -> list[Culprit]:
        return [c for c in self.culprits if c.target == target]

    def failing(self, target: str) -> bool:
        return not self.outcome(target).passed

    def __str__(self) -> str:
        from .render.text import report_text

        return report_text(self)

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> Path:
        return write_text(path, json.dumps({"format": "torchprobe-report", "version": 1, **self.to_dict()}, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "Report":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DumpError(f"{path}: cannot read a torchprobe report: {e}") from e
        if not isinstance(data, dict) or data.get("format") != "torchprobe-report":
            raise DumpError(f"{path}: not a torchprobe report (written by Report.to_json)")
        return _report_from_dict(data)

    def to_html(self, path: str | Path) -> Path:
        from .render.html import write_report_html

        return write_report_html(self, path)


def _stats(d: dict | None, cls: type = TensorStats) -> Any:
    if d is None:
        return None
    d = dict(d)
    d["shape"] = tuple(d["shape"])
    return cls(**d)


def _metrics(d: dict | None) -> ErrorMetrics | None:
    return None if d is None else ErrorMetrics(**d)


def _report_from_dict(d: dict[str, Any]) -> Report:
    return Report(
        model=d["model"],
        reference=d["reference"],
        metric=d["metric"],
        targets=tuple(d["targets"]),
        rows=tuple(_stats(r, Row) for r in d["rows"]),
        inputs=tuple(InputStats(i["key"], _stats(i["stats"])) for i in d["inputs"]),
        errors=tuple(
            ModuleError(**{**e, "metrics": _metrics(e["metrics"]), "stats": _stats(e["stats"]), "evidence": tuple(e["evidence"])})
            for e in d["errors"]
        ),
        outcomes=tuple(TargetOutcome(**{**o, "output_error": _metrics(o["output_error"])}) for o in d["outcomes"]),
        culprits=tuple(Culprit(**c) for c in d["culprits"]),
        peak_note=d.get("peak_note", ""),
    )


def worst(metric: str, errors: list[ErrorMetrics | None]) -> float:
    """The worst value of ``metric`` over several leaves (inf when any leaf is missing)."""
    values = [math.inf if e is None else e[metric] for e in errors]
    if not values:
        return math.nan
    if metric in ("cosine", "sqnr"):
        return min(values)
    return max(values)


def worst_of(metric: str, errors: list[ErrorMetrics | None]) -> ErrorMetrics | None:
    """The leaf with the worst ``metric`` (None when any leaf has no metrics)."""
    if not errors or any(e is None for e in errors):
        return None
    chosen = errors[0]
    for e in errors[1:]:
        if worse(metric, e[metric], chosen[metric]):
            chosen = e
    return chosen


def passes(metric: str, errors: list[ErrorMetrics | None], tol: float) -> bool:
    return bool(errors) and all(e is not None and e.finite and within(metric, e[metric], tol) for e in errors)
