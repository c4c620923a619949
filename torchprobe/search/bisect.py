"""bisect(): the smallest keep-FP32 set that brings the final output within tolerance, measured.

Candidates come from :func:`~torchprobe.search.isolate.isolate` (modules whose local error is
above ``tol``), unless given, and are minimized by :class:`~.strategies.MinimalSetSearch`. Every
answer is measured end to end with the plan applied; nothing is claimed that was not run.

Bound: with ``m`` candidates and a single culprit, at most ``2 + 2*ceil(log2 m)`` full-model
evaluations (before, all candidates, then at most two per halving), so O(log n) for ``n`` modules.
"""
from __future__ import annotations

import logging
import math
import traceback
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .. import distributed as _distributed
from ..capture import recording
from ..errors import NonFiniteReference
from ..formats import AUTOCAST_RULE_THRESHOLD
from ..kinds import FixOutcome
from ..localize import _quiet_unless_writer, check_inputs
from ..metrics import Metric, all_pass, get_metric, measure, resolve_tol
from ..names import ROOT, leaf_names, module_names
from ..progress import progress
from ..results import Fix, RuleComparison, SearchStep
from ..stats import read
from ..targets import PrecisionPlan, Runner, Target, build, parse_target
from ..tree import as_call, named_leaves, replay_copy
from .isolate import isolate, require_finite
from .strategies import MinimalSetSearch, single_culprit_bound

log = logging.getLogger(__name__)


class Evaluator:
    """Full-model evaluations of keep-FP32 sets, cached, logged and counted."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, target: Target, metric: Metric, tol: float, reference: Any,
                 group: Any = None):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.target, self.metric, self.tol, self.reference = target, metric, tol, reference
        self.group = group  # torch.distributed: every evaluation is the worst over the ranks
        self.results: dict[frozenset, SearchStep] = {}
        self.log: list[SearchStep] = []

    def __call__(self, keep: Iterable[str], note: str = "", count: bool = True) -> SearchStep:
        keep = frozenset(keep)
        if keep in self.results:
            return self.results[keep]
        failure = None
        try:
            runner = build(self.target, self.model, self.args, self.kwargs, keep_fp32=keep)
            a, k = replay_copy((self.args, self.kwargs))
            out = runner(*a, **k)
        except Exception as e:  # the user's model failing under the target, with this plan
            log.info("evaluation keeping %s failed:\n%s", sorted(keep), traceback.format_exc())
            failure = f"{type(e).__name__}: {e}"
            error, ok = math.inf, False
        else:
            ref_leaves = dict(named_leaves(self.reference))
            metrics = [measure(r, t) for p, t in named_leaves(out) for r in [ref_leaves.get(p)]
                       if r is not None and r.is_floating_point()]
            error = self.metric.worst(e[self.metric.name] for e in metrics)
            ok = all_pass(self.metric, metrics, self.tol)
        step = SearchStep(tuple(sorted(keep)), error, ok, note, failure)
        if self.group is not None:
            step = _distributed.merge_items([step], lambda s: s.keep_fp32, lambda s: (not s.passed, self.metric.badness(s.error)),
                                            self.group, "bisect()")[0]
        if count:
            self.results[keep] = step
            self.log.append(step)
        return step


def bisect(
    model: nn.Module,
    inputs: Any,
    target: str,
    tol: float | None = None,
    metric: str = "rel_l2",
    candidates: Sequence[str] | None = None,
    reference: str = "fp32",
    group: Any = None,
    rank: int | None = 0,
) -> Fix:
    """Find a small set of modules that, kept in FP32, brings the final output within ``tol``.

    The returned Fix is always measured end to end with the plan applied; when no candidate set
    meets ``tol``, or the reference itself is not finite, it says so (``bool(fix)`` is False).
    Under torch.distributed every rank of ``group`` (default: the world) runs it on its own
    inputs; each evaluation passes only when it passes on every rank, so the search takes the
    same steps everywhere and every rank returns the same Fix (progress bars on rank ``rank``).

        >>> fix = tp.bisect(model, x, target="strict-onnx:fp16", tol=1e-2)
        >>> fix.keep_fp32, fix.error_before, fix.error_after, fix.evaluations
        (('encoder.layers.1.norm2',), 0.98, 0.0004, 4)
    """
    m = get_metric(metric)
    parsed = parse_target(target)
    t_tol = resolve_tol(tol, parsed, m)
    group = _distributed.resolve_group(group)
    model = _distributed.copyable(model)  # FSDP2: a view whose copies stay sharded
    args, kwargs = as_call(inputs)
    check_inputs(model, args, kwargs, "bisect")
    if candidates is not None:
        PrecisionPlan(parsed.dtype, frozenset(candidates)).check(model)
    with torch.no_grad(), _quiet_unless_writer(rank, group):
        ref = build(reference, model, args, kwargs)
        a, k = replay_copy((args, kwargs))
        ref_out = ref(*a, **k)
        evaluate = Evaluator(model, args, kwargs, parsed, m, t_tol, ref_out, group)
        try:
            require_finite(ref_out, str(reference), group)
        except NonFiniteReference as e:
            return Fix(target=str(parsed), metric=m.name, tol=t_tol, keep_fp32=(), error_before=math.nan,
                       error_after=math.nan, evaluations=0, compilations=0, candidates=(), log=(), verified=False,
                       outcome=FixOutcome.REFERENCE_NOT_FINITE, detail=str(e))
        before = evaluate((), "nothing kept")
        compilations = 0
        if candidates is None:
            table = isolate(model, inputs, str(parsed), tol=t_tol, metric=m.name, reference=reference,
                            group=False if group is None else group, rank=rank)
            compilations = table.compilations
            stages = [("culprits", [r.module for r in table.culprits]),
                      ("above tol", [r.module for r in table.above_tol() if r.module != ROOT])]
        else:
            stages = [("given", list(candidates))]
        rule = _rule_comparison(ref, args, kwargs, evaluate, group)

        def fix(keep: tuple, after: SearchStep, cands: tuple, verified: bool, outcome: FixOutcome, detail: str = "") -> Fix:
            return Fix(target=str(parsed), metric=m.name, tol=t_tol, keep_fp32=keep, error_before=before.error,
                       error_after=after.error, evaluations=len(evaluate.log), compilations=compilations,
                       candidates=cands, log=tuple(evaluate.log), verified=verified, outcome=outcome, rule=rule,
                       bound=single_culprit_bound(len(cands)) if cands else 0, detail=detail)

        if before.passed:
            return fix((), before, (), True, FixOutcome.ALREADY_WITHIN)
        tried = []
        for label, names in stages:
            names = list(dict.fromkeys(names))
            if not names:
                continue
            everything = evaluate(names, f"all {label}")
            tried.append(f"{len(names)} {label}: {m.name} {everything.error:.3g}")
            if not everything.passed:
                continue
            search = MinimalSetSearch(_call_order(ref.module, names))
            for proposal in progress(_proposals(search), total=single_culprit_bound(len(names)), desc=f"bisect {parsed}"):
                search.step(evaluate(proposal, "search").passed)
            final = evaluate(search.result, "verify")
            outcome = FixOutcome.FOUND if final.passed else FixOutcome.NO_SET_MEETS_TOL
            return fix(tuple(sorted(search.result)), final, tuple(names), final.passed, outcome,
                       f"keep {len(search.result)} of {len(names)} candidates in FP32")
        if tried:
            return fix((), before, (), False, FixOutcome.NO_SET_MEETS_TOL, "; ".join(tried))
        return fix((), before, (), False, FixOutcome.NO_CANDIDATE)


def _proposals(search: MinimalSetSearch):
    while not search.done:
        yield search.proposal


def _call_order(model: nn.Module, names: list[str]) -> tuple[str, ...]:
    order = {n.name: i for i, n in enumerate(module_names(model).values())}
    return tuple(sorted(names, key=lambda n: order.get(n, len(order))))


def _rule_comparison(ref: Runner, args: tuple, kwargs: dict, evaluate: Evaluator, group: Any = None) -> RuleComparison:
    """Leaves whose FP32 input or output absmax exceeds 512, as rule-based autocast keeps them."""
    leaves = set(leaf_names(ref.module))
    summaries: list[tuple[str, Any]] = []

    def before(call, module, a, k) -> None:
        for _, t in named_leaves((a, k)):
            if t.is_floating_point() and t.numel():
                summaries.append((call.name, (t.dtype, tuple(t.shape), rec.summarize(t))))

    with recording(ref.module, lambda n: n in leaves, before=before) as rec:
        a, k = replay_copy((args, kwargs))
        ref(*a, **k)
    absmax: dict[str, float] = {}
    for (name, _), s in zip(summaries, read([p for _, p in summaries])):
        absmax[name] = max(absmax.get(name, 0.0), s.absmax or 0.0)
    for r in rec.rows:
        if r.is_floating and r.absmax is not None:
            absmax[r.module] = max(absmax.get(r.module, 0.0), r.absmax)
    if group is not None:  # the largest over the ranks: every rank keeps the same modules
        absmax = _distributed.all_max(absmax, group)
    kept = sorted(n for n, v in absmax.items() if v > AUTOCAST_RULE_THRESHOLD)
    step = evaluate(kept, "512 rule", count=False)
    return RuleComparison(AUTOCAST_RULE_THRESHOLD, tuple(kept), step.error, step.passed)
