"""From per-module local errors to the few modules that explain a divergence (or hide one).

Per target, a module call is *suspect* when its local error (the module alone on the reference's
exact inputs) exceeds the tolerance, it adds NaN/Inf, or it fails under the target. A container
is dropped when one of its descendants is suspect (the smallest module that explains it wins).

- Under a target whose final output diverges, the suspects are **culprits**.
- Under a target that passes, they are **latent** findings: broken inside, masked downstream
  (``masked_by`` names the first later module call whose propagated error is back within
  tolerance). Heavy FP16 underflow in a leaf's reference output is a latent finding of its own.
- When the reference itself is not finite, :func:`reference_origin` names the module that first
  produced NaN/Inf from finite inputs in the reference run.

Reasons (:class:`~torchprobe.kinds.Reason`), decided from typed data only: ``ERROR`` (fails under
the target), ``OVERFLOW`` (FP32 output beyond FP16 max, a backend overflow event, or Inf added),
``NAN``, ``UNDERFLOW`` (a large share of its values flush to zero in FP16), ``LOCAL_ERROR``.
Ranking: by reason severity, then larger local error, then call order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ..capture import Row
from ..formats import FP16_MAX, HEAVY_UNDERFLOW
from ..kinds import ErrorKind, Reason
from ..metrics import Metric
from ..names import ROOT, call_key_of, innermost, submodule
from ..results import Culprit, InputStats, ModuleError, TargetOutcome
from ..stats import TensorStats
from ..targets import Target


@dataclass
class _Call:
    key: str
    module: str
    order: int
    errors: list[ModuleError] = field(default_factory=list)


@dataclass(frozen=True)
class Evidence:
    """What the measurements say about one module call (typed; rendered into ``Culprit.evidence``)."""

    inputs: tuple[TensorStats, ...]
    outputs: tuple[Row, ...]
    module_type: str


def _calls(errors: Sequence[ModuleError], target: str, kind: ErrorKind) -> dict[str, _Call]:
    calls: dict[str, _Call] = {}
    for e in errors:
        if e.target == target and e.kind == kind:
            calls.setdefault(e.call_key, _Call(e.call_key, e.module, len(calls))).errors.append(e)
    return calls


class Explainer:
    """Evidence by module call, from the reference rows and input statistics."""

    def __init__(self, rows: Sequence[Row], inputs: Sequence[InputStats]):
        self.outputs: dict[str, list[Row]] = {}
        for r in rows:
            self.outputs.setdefault(call_key_of(r.key), []).append(r)
        self.inputs: dict[str, list[TensorStats]] = {}
        for i in inputs:
            if i.stats.is_floating:
                self.inputs.setdefault(call_key_of(i.key), []).append(i.stats)
        self.types = {call_key_of(r.key): r.module_type for r in rows}

    def flushed(self, key: str) -> float:
        """The largest share of non-zero values flushing to zero in FP16 among the call's tensors."""
        shares = [(s.flush_fp16 or 0) / max(s.numel - s.nonfinite, 1)
                  for s in (*self.outputs.get(key, ()), *self.inputs.get(key, ())) if s.is_floating]
        return max(shares, default=0.0)

    def in_absmax(self, key: str) -> float:
        return max((s.absmax for s in self.inputs.get(key, ()) if s.absmax == s.absmax), default=0.0)

    def out_absmax(self, key: str) -> float:
        return max((r.absmax for r in self.outputs.get(key, ()) if r.is_floating and r.absmax == r.absmax), default=0.0)


def _num(x: float) -> str:
    return f"{x:.3g}"


def _explain(call: _Call, failure: str | None, metric: Metric, tol: float, target: Target,
             ex: Explainer) -> tuple[Reason, str]:
    if failure:
        return Reason.ERROR, f"fails under {target}: {failure}"
    local = metric.worst(e.metrics[metric.name] for e in call.errors if e.metrics is not None)
    fp16 = target.dtype == torch.float16
    out_absmax = ex.out_absmax(call.key)
    if fp16 and out_absmax > FP16_MAX:
        return Reason.OVERFLOW, f"FP32 output absmax {_num(out_absmax)} is beyond FP16 max 65504"
    events = list(dict.fromkeys(ev for e in call.errors for ev in e.events))
    if events:
        reason = min((ev.reason for ev in events), key=lambda r: r.severity)
        text = "; ".join(ev.text or f"{ev.op}: {ev.what} overflowed ({ev.count} values)" for ev in events[:4])
        return reason, f"{text} (local {metric.name} {_num(local)})"
    added = [e.stats for e in call.errors if e.metrics is not None and e.metrics.nonfinite_mismatch and e.stats]
    if added:
        nan = sum(s.nan or 0 for s in added)
        inf = sum(s.inf or 0 for s in added)
        return (Reason.OVERFLOW if inf else Reason.NAN,
                f"produces {inf} Inf / {nan} NaN from finite inputs (input absmax {_num(ex.in_absmax(call.key))})")
    flushed = ex.flushed(call.key)
    if fp16 and flushed > HEAVY_UNDERFLOW:
        return Reason.UNDERFLOW, f"{flushed:.1%} of its values flush to zero in FP16 (local {metric.name} {_num(local)})"
    return Reason.LOCAL_ERROR, f"local {metric.name} {_num(local)} on the reference's exact inputs (tol {_num(tol)})"


def _suspect(call: _Call, metric: Metric, tol: float) -> tuple[bool, str | None]:
    failure = next((e.failure for e in call.errors if e.failure), None)
    values = [e.metrics for e in call.errors if e.metrics is not None]
    adds = any(m.nonfinite_mismatch for m in values)
    too_large = any(not metric.passes(m[metric.name], tol) for m in values)
    return bool(failure or adds or too_large), failure


def _masked_by(propagated: dict[str, _Call], after: int, metric: Metric, tol: float) -> str | None:
    for call in propagated.values():
        if call.order > after and call.errors and all(
                e.metrics is not None and e.metrics.finite and metric.passes(e.metrics[metric.name], tol) for e in call.errors):
            return call.key
    return None


def find_findings(rows: Sequence[Row], inputs: Sequence[InputStats], errors: Sequence[ModuleError],
                  outcomes: Sequence[TargetOutcome], metric: Metric, targets: Mapping[str, Target],
                  leaves: set[str], ignored_failures: set[tuple[str, str]] = frozenset()) -> tuple[list[Culprit], list[Culprit]]:
    """(culprits, latent) for every target; see the module docstring."""
    ex = Explainer(rows, inputs)
    culprits: list[tuple[tuple, Culprit]] = []
    latent: list[tuple[tuple, Culprit]] = []
    for outcome in outcomes:
        name, target = outcome.target, targets[outcome.target]
        local = _calls(errors, name, ErrorKind.LOCAL)
        propagated = _calls(errors, name, ErrorKind.PROPAGATED)
        suspects: dict[str, tuple[_Call, str | None]] = {}
        for call in local.values():
            ok_errors = [e for e in call.errors if (name, e.call_key) not in ignored_failures or not e.failure]
            if not ok_errors:
                continue
            call = _Call(call.key, call.module, call.order, ok_errors)
            is_suspect, failure = _suspect(call, metric, outcome.tol)
            if is_suspect:
                suspects[call.key] = (call, failure)
        if outcome.passed and target.dtype == torch.float16:
            for call in local.values():
                if call.key not in suspects and call.module in leaves and ex.flushed(call.key) > HEAVY_UNDERFLOW:
                    suspects[call.key] = (call, None)
        kept = set(innermost(c.module for c, _ in suspects.values()))
        for call, failure in suspects.values():
            if call.module not in kept:
                continue
            reason, evidence = _explain(call, failure, metric, outcome.tol, target, ex)
            local_error = math.inf if failure else metric.worst(e.metrics[metric.name] for e in call.errors if e.metrics)
            prop = propagated.get(call.key)
            prop_error = metric.worst(math.inf if e.metrics is None else e.metrics[metric.name] for e in prop.errors) if prop else None
            rank = (reason.severity, -metric.badness(local_error), call.order)
            if outcome.passed:
                masked = _masked_by(propagated, prop.order if prop else -1, metric, outcome.tol)
                latent.append((rank, Culprit(call.module, call.key, name, reason, evidence, local_error, prop_error,
                                             ex.types.get(call.key, ""), masked)))
            else:
                culprits.append((rank, Culprit(call.module, call.key, name, reason, evidence, local_error, prop_error,
                                               ex.types.get(call.key, ""))))
    culprits.sort(key=lambda item: item[0])
    latent.sort(key=lambda item: item[0])
    return [c for _, c in culprits], [c for _, c in latent]


def reference_origin(rows: Sequence[Row], inputs: Sequence[InputStats], reference: str, model: nn.Module) -> list[Culprit]:
    """The module calls that first produce NaN/Inf from finite inputs in the reference run."""
    ex = Explainer(rows, inputs)
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(call_key_of(r.key), len(order))
    broken = []
    for key in order:
        outs = [r for r in ex.outputs[key] if r.is_floating and r.nonfinite]
        ins = ex.inputs.get(key, [])
        if outs and all(s.nonfinite == 0 for s in ins):
            broken.append((key, outs))
    if not broken:
        root_inputs = [s for s in ex.inputs.get(ROOT, []) if s.nonfinite]
        if not root_inputs:
            return []
        nan = sum(s.nan or 0 for s in root_inputs)
        inf = sum(s.inf or 0 for s in root_inputs)
        return [Culprit(ROOT, ROOT, reference, Reason.NAN if nan else Reason.OVERFLOW,
                        f"the inputs given to the model hold {nan} NaN / {inf} Inf", math.nan, None, ex.types.get(ROOT, ""))]
    names = {call_key_of(k).split("#")[0] for k, _ in broken}
    kept = set(innermost(names))
    out = []
    for key, outs in broken:
        module = key.split("#")[0]
        if module not in kept:
            continue
        nan = sum(r.nan or 0 for r in outs)
        inf = sum(r.inf or 0 for r in outs)
        leaves = ", ".join(f"{r.leaf or 'output'}: {r.nan} NaN / {r.inf} Inf of {r.numel}" for r in outs[:3])
        evidence = f"produces NaN/Inf from finite inputs in the {reference} reference ({leaves})"
        bad = _bad_parameters(model, module)
        if bad:
            evidence += f"; its parameter {bad}"
        out.append(Culprit(module, key, reference, Reason.NAN if nan else Reason.OVERFLOW, evidence, math.nan, None,
                           ex.types.get(key, "")))
    return out[:1] + [c for c in out[1:] if c.module != out[0].module]


def _bad_parameters(model: nn.Module, name: str) -> str:
    try:
        module = submodule(model, name)
    except AttributeError:
        return ""
    for pname, p in module.named_parameters(recurse=False):
        nan, inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
        if nan or inf:
            return f"{pname} holds {nan} NaN / {inf} Inf"
    return ""
