"""isolate() and bisect(): per-module local error, and the smallest verified keep-FP32 set.

``isolate`` runs each chosen module alone under the target, fed its real captured reference
inputs, compiling (for inductor/tensorrt) one module at a time, so fusion inside a module is real
and no engine layer has to be mapped back to a module. By default it is hierarchical: the
top-level blocks first, then only the children of blocks whose local error is above tolerance.

``bisect`` takes the culprits ``isolate`` finds as candidates and minimizes them by adaptive
group testing over arbitrary subsets (not prefixes): keep one half in FP32; if that passes,
recurse into it, else try the other half; if neither half alone passes, minimize each half with
the other kept. Every answer is measured end to end; nothing is claimed that was not run.

Bound: with ``m`` candidates and a single culprit, bisect makes at most ``2 + 2*ceil(log2 m)``
full-model evaluations (before, all candidates, then at most two per halving), so O(log n) for a
model of ``n`` modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Sequence

import torch
from torch import nn

from .capture import Call, module_calls
from .errors import InvalidArgument
from .findings import passes, worst, worst_of
from .localize import resolve_tol
from .metrics import ErrorMetrics, get_metric, measure, within
from .names import ROOT, has_forward, is_within, leaf_names, module_names, submodule
from .progress import progress
from .render.text import num
from .stats import Summarizer, read as read_stats
from .targets import PrecisionPlan, Runner, Target, build, parse_target
from .tree import as_call, map_tensors, named_leaves

AUTOCAST_RULE_THRESHOLD = 512.0  # TensorRT / ModelOpt autocast: keep FP32 when |x| > 512


# -- isolate ---------------------------------------------------------------------------------
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
        return [r for r in self.rows if r.failure or not within(self.metric, r.error, self.tol)]

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
        from tabulate import tabulate

        culprits = {r.key for r in self.culprits}
        rows = [["  " * r.depth + r.key + (" *" if r.key in culprits else ""), r.module_type,
                 "failed: " + r.failure if r.failure else num(r.error), r.backend_info or ""] for r in self.rows]
        head = (f"isolate {self.target}: {len(self.rows)} module calls, {self.compilations} compilations, "
                f"{self.reference_passes} reference passes; local {self.metric}, tol {num(self.tol)}")
        tail = f"\nculprits: {', '.join(sorted(culprits))}" if culprits else "\nno module above tolerance"
        return head + "\n" + tabulate(rows, headers=["module call", "type", f"local {self.metric}", "backend"], disable_numparse=True) + tail


@dataclass
class _Captured:
    call: Call
    args: tuple
    kwargs: dict
    output: Any


def _capture_io(ref: Runner, names: set[str], args: tuple, kwargs: dict) -> list[_Captured]:
    """One reference pass keeping inputs (cloned before the module runs) and outputs of ``names``."""
    captured: dict[str, _Captured] = {}
    order: list[str] = []

    def before(call: Call, module: nn.Module, a: tuple, k: dict) -> None:
        a, k = map_tensors((a, k), lambda t: t.detach().clone())
        captured[call.key] = _Captured(call, a, k, None)

    def after(call: Call, module: nn.Module, a: tuple, k: dict, out: Any) -> None:
        captured[call.key].output = map_tensors(out, lambda t: t.detach().clone())
        order.append(call.key)

    with module_calls(ref.module, lambda n: n in names, before=before, after=after):
        ref(*args, **kwargs)
    return [captured[k] for k in order]


def _signature(args: tuple, kwargs: dict) -> tuple:
    return tuple((p, tuple(t.shape), t.dtype) for p, t in named_leaves((args, kwargs)))


def _children(model: nn.Module, name: str) -> list[str]:
    """Children of ``name`` that run; containers without a forward (ModuleList/ModuleDict) are
    replaced by their own children."""
    names = module_names(model)
    out: list[str] = []
    for child in submodule(model, name).children():
        child_name = names[child].name
        if not has_forward(child):
            out.extend(_children(model, child_name))
        else:
            out.append(child_name)
    return out


def isolate(
    model: nn.Module,
    inputs: Any,
    target: str,
    modules: str | Sequence[str] | None = None,
    tol: float | None = None,
    metric: str = "rel_l2",
    reference: str = "fp32",
) -> Isolation:
    """Run each chosen module alone under ``target`` on its captured reference inputs.

    ``modules``: ``None`` (hierarchical: top-level blocks, descending only into blocks above
    ``tol``), ``"blocks"`` (top-level blocks only), ``"leaves"`` (every leaf), or a list of names.
    Compiled modules are cached per (module, input shapes/dtypes); ``compilations`` counts them.

        >>> table = tp.isolate(model, x, target="strict:fp16")
        >>> print(table); table.culprits[0].module
        'encoder.norm'
    """
    get_metric(metric)
    parsed = parse_target(target)
    t_tol = resolve_tol(tol, parsed, metric)
    args, kwargs = as_call(inputs)
    ref = build(reference, model, args, kwargs)
    runner = build(parsed, model, args, kwargs)
    tops = _children(ref.module, ROOT)
    depth_of = {n: 0 for n in tops}
    hierarchical = modules is None
    if modules is None or modules == "blocks":
        level = tops
    elif modules == "leaves":
        level = leaf_names(ref.module)
    elif isinstance(modules, str):
        raise InvalidArgument(f"modules={modules!r}: use None (hierarchical), 'blocks', 'leaves' or a list of module names")
    else:
        level = list(modules)
        PrecisionPlan(parsed.dtype, frozenset(level)).check(model)
    cache: dict[tuple, Callable[..., Any]] = {}
    rows: list[IsolatedModule] = []
    passes_run = 0
    with torch.no_grad():
        while level:
            captured = _capture_io(ref, set(level), args, kwargs)
            passes_run += 1
            next_level: list[str] = []
            for item in progress(captured, desc=f"isolate {parsed}"):
                row = _isolate_one(runner, item, cache, metric, depth_of.get(item.call.name, 0))
                rows.append(row)
                above = row.failure or not within(metric, row.error, t_tol)
                if hierarchical and above:
                    for child in _children(ref.module, item.call.name):
                        if child not in depth_of:
                            depth_of[child] = depth_of.get(item.call.name, 0) + 1
                            next_level.append(child)
            level = next_level
    return Isolation(str(parsed), metric, t_tol, tuple(rows), len(cache), passes_run)


def _isolate_one(runner: Runner, item: _Captured, cache: dict, metric: str, depth: int) -> IsolatedModule:
    name, key = item.call.name, item.call.key
    sig = (name, _signature(item.args, item.kwargs))
    fresh = sig not in cache
    try:
        if fresh:
            cache[sig] = runner.part(name, item.args, item.kwargs)
        out = cache[sig](*item.args, **item.kwargs)
    except Exception as e:
        return IsolatedModule(name, key, item.call.module_type, depth, math.inf, None, f"{type(e).__name__}: {e}"[:300], fresh)
    ref_leaves = [(p, t) for p, t in named_leaves(item.output) if t.is_floating_point()]
    test = dict(named_leaves(out))
    metrics = [measure(t, test[p]) if p in test and test[p].shape == t.shape else None for p, t in ref_leaves]
    value = worst(metric, metrics)
    chosen = worst_of(metric, metrics)
    info = getattr(getattr(cache[sig], "backend_fn", None), "info", None)
    return IsolatedModule(name, key, item.call.module_type, depth, value, chosen, None, fresh, None if info is None else str(info))


# -- bisect ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchStep:
    """One full-model evaluation: the kept set, the measured final error, pass or fail."""

    keep_fp32: tuple[str, ...]
    error: float
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class RuleComparison:
    """What the threshold rule of TensorRT/ModelOpt autocast would keep, and whether it works."""

    threshold: float
    keep_fp32: tuple[str, ...]
    error: float
    passed: bool


Search = Generator[frozenset, bool, frozenset]


def _minimize(candidates: tuple[str, ...], base: frozenset) -> Search:
    """Smallest subset S of candidates with pass(base | S), given pass(base | candidates)."""
    if len(candidates) <= 1:
        return frozenset(candidates)
    half = len(candidates) // 2
    first, second = candidates[:half], candidates[half:]
    if (yield base | frozenset(first)):
        return (yield from _minimize(first, base))
    if (yield base | frozenset(second)):
        return (yield from _minimize(second, base))
    kept_first = yield from _minimize(first, base | frozenset(second))
    kept_second = yield from _minimize(second, base | kept_first)
    return kept_first | kept_second


class MinimalSetSearch:
    """Strategy object: ``proposal`` is the set to try next; ``step(passed)`` returns True when done.

    Requires that keeping every candidate passes. ``result`` holds the minimal set when done.
    """

    def __init__(self, candidates: Sequence[str]):
        self.candidates = tuple(candidates)
        self._search = _minimize(self.candidates, frozenset())
        self.result: frozenset | None = None
        self.proposal: frozenset | None = None
        self.steps = 0
        self._advance(None)

    def _advance(self, passed: bool | None) -> bool:
        try:
            self.proposal = next(self._search) if passed is None else self._search.send(passed)
            return False
        except StopIteration as stop:
            self.result, self.proposal = stop.value, None
            return True

    @property
    def done(self) -> bool:
        return self.result is not None

    def step(self, passed: bool) -> bool:
        self.steps += 1
        return self._advance(passed)

    def remaining(self) -> int:
        """Upper bound on evaluations left for a single culprit: two per halving."""
        return 0 if self.done else 2 * math.ceil(math.log2(max(len(self.proposal or ()), 2)))


@dataclass(frozen=True)
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
    message: str
    rule: RuleComparison | None = None
    bound: int = 0

    def __bool__(self) -> bool:
        return self.verified and within(self.metric, self.error_after, self.tol)

    @property
    def plan(self) -> PrecisionPlan:
        return PrecisionPlan(parse_target(self.target).dtype, frozenset(self.keep_fp32))

    def apply(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` running this fix (``model`` itself is untouched).

        For cast backends the copy has target-dtype weights with kept modules in FP32 (feed it
        target-dtype inputs); for autocast it stays FP32 with autocast-disabled regions.
        """
        from .targets import get_backend, model_device

        target = parse_target(self.target)
        backend = get_backend(target.backend)
        return self.plan.apply(model, cast_weights=backend.cast_weights, autocast_device=model_device(model).type)

    def snippet(self, target: str | None = None) -> str:
        """Code to paste: Torch-TensorRT settings (``tensorrt``/``strict``) or autocast regions."""
        from .render.snippets import fix_snippet

        return fix_snippet(self, target)

    def __str__(self) -> str:
        from .render.text import fix_text

        return fix_text(self)


class _Evaluator:
    """Full-model evaluations of keep-FP32 sets, cached, logged and counted."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, target: Target, metric: str, tol: float, reference: Any):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.target, self.metric, self.tol, self.reference = target, metric, tol, reference
        self.results: dict[frozenset, SearchStep] = {}
        self.log: list[SearchStep] = []

    def __call__(self, keep: Iterable[str], note: str = "", count: bool = True) -> SearchStep:
        keep = frozenset(keep)
        if keep in self.results:
            return self.results[keep]
        try:
            runner = build(self.target, self.model, self.args, self.kwargs, keep_fp32=keep)
            out = runner(*self.args, **self.kwargs)
            ref_leaves = dict(named_leaves(self.reference))
            metrics = [measure(r, t) for (p, t) in named_leaves(out) for r in [ref_leaves.get(p)] if r is not None and r.is_floating_point()]
            error = worst(self.metric, metrics)
            ok = passes(self.metric, metrics, self.tol)
        except Exception as e:
            error, ok, note = math.inf, False, f"{note} failed: {type(e).__name__}: {e}"[:300]
        step = SearchStep(tuple(sorted(keep)), error, ok, note)
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
) -> Fix:
    """Find a small set of modules that, kept in FP32, brings the final output within ``tol``.

    Candidates come from :func:`isolate` (modules whose local error is above ``tol``), unless
    given. The returned Fix is always measured end to end with the plan applied; when no
    candidate set meets ``tol`` it says so (``bool(fix)`` is False) and lists what was tried.

        >>> fix = tp.bisect(model, x, target="strict:fp16", tol=1e-2)
        >>> fix.keep_fp32, fix.error_before, fix.error_after, fix.evaluations
        (('encoder.norm',), 0.98, 0.0004, 4)
    """
    get_metric(metric)
    parsed = parse_target(target)
    t_tol = resolve_tol(tol, parsed, metric)
    args, kwargs = as_call(inputs)
    with torch.no_grad():
        ref = build(reference, model, args, kwargs)
        ref_out = ref(*args, **kwargs)
        evaluate = _Evaluator(model, args, kwargs, parsed, metric, t_tol, ref_out)
        before = evaluate((), "nothing kept")
        compilations = 0
        if candidates is None:
            table = isolate(model, inputs, str(parsed), tol=t_tol, metric=metric, reference=reference)
            compilations = table.compilations
            stages = [("culprits", [r.module for r in table.culprits]), ("above tol", [r.module for r in table.above_tol() if r.module != ROOT])]
        else:
            PrecisionPlan(parsed.dtype, frozenset(candidates)).check(model)
            stages = [("given", list(candidates))]
        rule = _rule_comparison(model, args, kwargs, ref, evaluate)
        if before.passed:
            return _fix(parsed, metric, t_tol, (), before, before, evaluate, compilations, (), True,
                        "already within tolerance: nothing needs to stay in FP32", rule)
        tried = []
        for label, names in stages:
            names = list(dict.fromkeys(names))
            if not names:
                continue
            everything = evaluate(names, f"all {label}")
            tried.append(f"{len(names)} {label}: {metric} {num(everything.error)}")
            if not everything.passed:
                continue
            search = MinimalSetSearch(_call_order(ref.module, names))
            while not search.done:
                step = evaluate(search.proposal, "search")
                search.step(step.passed)
            final = evaluate(search.result, "verify")
            return _fix(parsed, metric, t_tol, tuple(sorted(search.result)), before, final, evaluate, compilations,
                        tuple(names), final.passed, f"keep {len(search.result)} of {len(names)} candidates in FP32", rule)
        message = ("no candidate set meets tol " + num(t_tol) + "; tried: " + "; ".join(tried)) if tried else \
            "no module shows local error above tol: the error builds up across the model (try a looser tol or a list of candidates)"
        return _fix(parsed, metric, t_tol, (), before, before, evaluate, compilations, (), False, message, rule)


def _call_order(model: nn.Module, names: list[str]) -> tuple[str, ...]:
    order = {n.name: i for i, n in enumerate(module_names(model).values())}
    return tuple(sorted(names, key=lambda n: order.get(n, len(order))))


def _fix(target: Target, metric: str, tol: float, keep: tuple, before: SearchStep, after: SearchStep, evaluate: _Evaluator,
         compilations: int, candidates: tuple, verified: bool, message: str, rule: RuleComparison | None) -> Fix:
    bound = 2 + 2 * math.ceil(math.log2(max(len(candidates), 1))) if candidates else 1
    return Fix(str(target), metric, tol, keep, before.error, after.error, len(evaluate.log), compilations, candidates,
               tuple(evaluate.log), verified, message, rule, bound)


def _rule_comparison(model: nn.Module, args: tuple, kwargs: dict, ref: Runner, evaluate: _Evaluator) -> RuleComparison:
    """Leaves whose FP32 input or output absmax exceeds 512, as rule-based autocast keeps them."""
    leaves = set(leaf_names(ref.module))
    summarize = Summarizer()
    pending: list[tuple[str, Any]] = []

    def after(call: Call, module: nn.Module, a: tuple, k: dict, out: Any) -> None:
        for _, t in named_leaves((a, k, out)):
            if t.is_floating_point() and t.numel():
                pending.append((call.name, (t.dtype, tuple(t.shape), summarize(t))))

    with module_calls(ref.module, lambda n: n in leaves, after=after):
        ref(*args, **kwargs)
    stats = read_stats([p for _, p in pending])
    kept = sorted({name for (name, _), s in zip(pending, stats) if s.absmax is not None and s.absmax > AUTOCAST_RULE_THRESHOLD})
    step = evaluate(kept, "512 rule", count=False)
    return RuleComparison(AUTOCAST_RULE_THRESHOLD, tuple(kept), step.error, step.passed)
