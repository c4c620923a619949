"""Culprit ranking: from per-module local errors to the few modules that explain a divergence.

Rules, per target:

- a module call is a candidate when its local error (the module alone on the reference's exact
  inputs) exceeds the tolerance, it adds NaN/Inf, or it fails under the target;
- a container is dropped when one of its descendants is a candidate (the smallest module that
  explains the divergence wins);
- candidates are reported for targets whose final output diverges, and for any target where a
  module adds NaN/Inf;
- the reason is ``error``, ``overflow``, ``nan``, ``underflow`` or ``local-error``, with evidence
  from the reference statistics of the module's inputs and outputs and from the backend (strict
  records which primitive overflowed);
- ranking: error/overflow/nan first, then larger local error, then call order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .capture import HEAVY_UNDERFLOW, Row
from .findings import Culprit, InputStats, ModuleError, TargetOutcome, worst
from .formats import FP16_MAX
from .metrics import within
from .names import is_within
from .render.text import num
from .targets import Target

_SEVERITY = {"error": 0, "overflow": 1, "nan": 2, "underflow": 3, "local-error": 4}
_NORMS = ("LayerNorm", "GroupNorm", "BatchNorm", "RMSNorm", "InstanceNorm")


@dataclass
class _Call:
    key: str
    module: str
    order: int
    errors: list[ModuleError]


def _calls(errors: Sequence[ModuleError], target: str, kind: str) -> dict[str, _Call]:
    calls: dict[str, _Call] = {}
    for e in errors:
        if e.target != target or e.kind != kind:
            continue
        call_key = e.module if e.call == 0 else f"{e.module}#{e.call}"
        entry = calls.setdefault(call_key, _Call(call_key, e.module, len(calls), []))
        entry.errors.append(e)
    return calls


def _call_key(key: str) -> str:
    return key.split(":", 1)[0]


def find_culprits(rows: Sequence[Row], inputs: Sequence[InputStats], errors: Sequence[ModuleError],
                  outcomes: Sequence[TargetOutcome], metric: str, targets: Mapping[str, Target]) -> list[Culprit]:
    out_stats: dict[str, list[Row]] = {}
    for r in rows:
        out_stats.setdefault(_call_key(r.key), []).append(r)
    in_stats: dict[str, list] = {}
    for i in inputs:
        if i.stats.is_floating:
            in_stats.setdefault(_call_key(i.key), []).append(i.stats)
    module_types = {_call_key(r.key): r.module_type for r in rows}
    found: list[tuple[tuple, Culprit]] = []
    for outcome in outcomes:
        target = outcome.target
        local = _calls(errors, target, "local")
        propagated = _calls(errors, target, "propagated")
        candidates = []
        for call in local.values():
            failure = next((e.failure for e in call.errors if e.failure), None)
            values = [e.metrics for e in call.errors if e.metrics is not None]
            adds_nonfinite = any(not m.finite for m in values)
            too_large = any(not within(metric, m[metric], outcome.tol) for m in values)
            if failure or adds_nonfinite or (too_large and not outcome.passed):
                candidates.append((call, failure, adds_nonfinite))
        names = {c.module for c, _, _ in candidates}
        for call, failure, adds_nonfinite in candidates:
            if any(other != call.module and is_within(other, call.module) for other in names):
                continue
            reason, evidence = _explain(call, failure, adds_nonfinite, metric, outcome.tol, targets[target],
                                        in_stats.get(call.key, []), out_stats.get(call.key, []), module_types.get(call.key, ""))
            local_error = worst(metric, [e.metrics for e in call.errors]) if not failure else math.inf
            prop = propagated.get(call.key)
            prop_error = worst(metric, [e.metrics for e in prop.errors]) if prop else None
            culprit = Culprit(call.module, call.key, target, reason, evidence, local_error, prop_error, module_types.get(call.key, ""))
            size = -local_error if not math.isnan(local_error) else -math.inf
            found.append(((_SEVERITY[reason], size, call.order), culprit))
    found.sort(key=lambda item: item[0])
    return [c for _, c in found]


def _explain(call: _Call, failure: str | None, adds_nonfinite: bool, metric: str, tol: float, target: Target,
             inputs: list, outputs: list[Row], module_type: str) -> tuple[str, str]:
    if failure:
        return "error", f"fails under {target}: {failure}"
    backend_evidence = [text for e in call.errors for text in e.evidence]
    in_absmax = max((s.absmax for s in inputs), default=0.0)
    out_absmax = max((r.absmax for r in outputs if r.is_floating), default=0.0)
    fp16 = target.dtype == torch.float16
    local = worst(metric, [e.metrics for e in call.errors])
    if fp16 and out_absmax > FP16_MAX:
        return "overflow", f"FP32 output absmax {num(out_absmax)} is beyond FP16 max 65504"
    if backend_evidence:
        kind = "overflow" if any("overflow" in t or "Inf" in t for t in backend_evidence) else "nan"
        return kind, "; ".join(dict.fromkeys(backend_evidence))[:400] + f" (local {metric} {num(local)})"
    if fp16 and module_type.endswith(_NORMS) and in_absmax**2 > FP16_MAX:
        return "overflow", (f"input absmax {num(in_absmax)}: (x - mean)^2 reaches ~{num(in_absmax**2)}, beyond FP16 max 65504, "
                            f"when the normalization is computed in FP16 (local {metric} {num(local)})")
    if adds_nonfinite:
        nan = sum((e.stats.nan or 0) for e in call.errors if e.stats)
        inf = sum((e.stats.inf or 0) for e in call.errors if e.stats)
        kind = "overflow" if inf else "nan"
        return kind, f"produces {inf} Inf / {nan} NaN from finite inputs (input absmax {num(in_absmax)})"
    flushed = [(r.flush_fp16 or 0) / max(r.numel, 1) for r in outputs if r.is_floating]
    in_flushed = [(s.flush_fp16 or 0) / max(s.numel, 1) for s in inputs]
    if fp16 and max(flushed + in_flushed, default=0.0) > HEAVY_UNDERFLOW:
        return "underflow", f"{max(flushed + in_flushed):.1%} of its values flush to zero in FP16 (local {metric} {num(local)})"
    return "local-error", f"local {metric} {num(local)} on the reference's exact inputs (tol {num(tol)})"
