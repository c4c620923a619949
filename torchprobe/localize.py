"""report(): where and why a model's output diverges under each target.

Runs, all on private copies of the model (the user's module is never run or changed):

1. **Reference pass** (eager FP32, or FP64): per-module output statistics and a copy of every
   output (on the device, or in host memory with ``offload=True``). Inside it, before each module runs, a **shadow**
   run executes the same module of each target's copy on the reference's exact inputs: the error
   it shows is the error that module *introduces* (local error), not the one it inherits.
2. **Propagated pass** per target: the whole model under the target; each module's output is
   compared with the reference copy from step 1. Compiling backends (inductor, tensorrt) are run
   whole and only their final output is compared; their per-module view is the local error.

Peak memory: one copy of the model per target plus the reference, one copy of every module output
of the reference (in host memory with ``offload=True``), and the live activations of one
forward at a time. Shadow runs of nested containers re-run their subtree, so the reference pass
costs about (depth of nesting) target forwards per target.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import stats as _stats
from .capture import Call, Recording, module_calls
from .culprits import find_culprits
from .errors import InvalidArgument, UnsupportedTarget
from .findings import InputStats, ModuleError, Report, TargetOutcome, passes, worst_of
from .metrics import error_vector, from_vector, get_metric
from .names import ROOT, Patterns, leaf_names, name_filter
from .targets import Runner, Target, build, parse_target
from .tree import as_call, leaf_key, map_tensors, named_leaves

log = logging.getLogger(__name__)

DEFAULT_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-6}
DEFAULT_TARGETS = ("autocast:fp16", "eager:fp16", "strict:fp16")


def default_tol(target: Target, metric: str = "rel_l2") -> float:
    if metric == "cosine":
        return 1e-4
    if metric == "sqnr":
        return 20.0
    return DEFAULT_TOL[target.dtype]


def resolve_tol(tol: float | dict[str, float] | None, target: Target, metric: str) -> float:
    if tol is None:
        return default_tol(target, metric)
    if isinstance(tol, dict):
        return float(tol.get(str(target), default_tol(target, metric)))
    return float(tol)


def module_filter(model: nn.Module, modules: Patterns | str) -> Callable[[str], bool]:
    """``None`` (all), ``"leaves"``, or globs; the root is always kept (it is the final output)."""
    if modules == "leaves":
        leaves = set(leaf_names(model))
        return lambda name: name == ROOT or name in leaves
    keep = name_filter(modules)
    return lambda name: name == ROOT or keep(name)


@dataclass
class _Pending:
    """Device-side measurements awaiting one host read."""

    call: Call
    key: str
    target: str
    kind: str
    vector: Tensor | None = None
    stats: tuple[torch.dtype, tuple[int, ...], Tensor | None] | None = None
    failure: str | None = None
    evidence: list[Any] = field(default_factory=list)


def _clone_inputs(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().clone())


class _Session:
    """One report(): the reference pass with shadows, then a propagated pass per target."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, reference: Target, targets: list[Target],
                 keep: Callable[[str], bool], local: bool, offload: bool):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.reference, self.targets, self.keep, self.local = reference, targets, keep, local
        self.offload = offload
        self.pending: list[_Pending] = []
        self.inputs: list[tuple[str, torch.dtype, tuple, Tensor | None]] = []
        self.failures: dict[str, str] = {}
        self.runners: dict[str, Runner] = {}
        self._parts: dict[tuple[str, str], Callable[..., Any]] = {}
        self._shadow: dict[tuple[str, str], Any] = {}
        self.recording: Recording | None = None

    # -- building ---------------------------------------------------------------------------
    def prepare(self) -> Runner:
        ref = build(self.reference, self.model, self.args, self.kwargs)
        for target in self.targets:
            try:
                self.runners[str(target)] = build(target, self.model, self.args, self.kwargs)
            except UnsupportedTarget as e:
                self.failures[str(target)] = str(e)
        return ref

    # -- reference pass ---------------------------------------------------------------------
    def reference_pass(self, ref: Runner) -> Recording:
        rec = Recording(ref.module, self.keep, capture=True, offload=self.offload, fused=None)
        self.recording = rec
        with module_calls(ref.module, self.keep, before=self._before, after=self._after(rec)) as counts:
            rec.calls = counts
            ref(*self.args, **self.kwargs)
        return rec

    def _before(self, call: Call, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for path, t in named_leaves((args, kwargs)):
            vector = self.recording._summary_of(t, copy=False)[0]
            self.inputs.append((leaf_key(call.key, path), t.dtype, tuple(t.shape), vector))
        if not self.local or call.name == ROOT:
            return
        for name, runner in self.runners.items():
            try:
                part = self._parts.get((name, call.name))
                if part is None:
                    part = self._parts[(name, call.name)] = runner.part(call.name, args, kwargs)
                a, k = _clone_inputs((args, kwargs))
                self._shadow[(name, call.key)] = (part(*a, **k), _evidence(part))
            except Exception as e:  # a module failing under a target is a finding, not a crash
                self._shadow[(name, call.key)] = e

    def _after(self, rec: Recording) -> Callable[..., None]:
        def after(call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            rec._after(call, module, args, kwargs, output)
            leaves = named_leaves(output)
            for name in self.runners:
                shadow = self._shadow.pop((name, call.key), None)
                if shadow is None:
                    continue
                if isinstance(shadow, Exception):
                    self.pending.append(_Pending(call, call.key, name, "local", failure=_describe(shadow)))
                    continue
                out, evidence = shadow
                self._compare(call, leaves, dict(named_leaves(out)), name, "local", evidence)

        return after

    def _compare(self, call: Call, ref_leaves: Sequence[tuple[str, Tensor]], test: dict[str, Tensor],
                 target: str, kind: str, evidence: list[str] | None = None) -> None:
        for path, r in ref_leaves:
            if not r.is_floating_point():
                continue
            key = leaf_key(call.key, path)
            t = test.get(path)
            if t is None or t.shape != r.shape:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                self.pending.append(_Pending(call, key, target, kind, failure=f"output {path or 'tensor'}: expected shape {tuple(r.shape)}, got {got}"))
                continue
            vector = error_vector(r, t)
            stats = (t.dtype, tuple(t.shape), self.recording._summarize(t))
            self.pending.append(_Pending(call, key, target, kind, vector, stats, evidence=list(evidence or [])))

    # -- propagated passes ------------------------------------------------------------------
    def propagated_pass(self, name: str, runner: Runner, reference: dict[str, Tensor]) -> bool:
        """Run the whole model under the target; False when it failed (recorded as a finding)."""
        per_module = not runner.backend.compiles
        keep = self.keep if per_module else (lambda n: n == ROOT)
        open_calls: list[str] = []

        def before(call: Call, module: nn.Module, args: tuple, kwargs: dict) -> None:
            open_calls.append(call.key)

        def after(call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            open_calls.pop()
            ref_leaves = [(p, reference[leaf_key(call.key, p)]) for p, _ in named_leaves(output) if leaf_key(call.key, p) in reference]
            device_leaves = [(p, r.to(t.device, non_blocking=True)) for (p, r), (_, t) in zip(ref_leaves, named_leaves(output))]
            self._compare(call, device_leaves, dict(named_leaves(output)), name, "propagated")

        try:
            if per_module:
                with module_calls(runner.module, keep, before=before, after=after):
                    runner(*self.args, **self.kwargs)
            else:
                out = runner(*self.args, **self.kwargs)
                root = Call(ROOT, 0, type(runner.module).__name__)
                ref_leaves = [(p, reference[leaf_key(ROOT, p)].to(t.device)) for p, t in named_leaves(out) if leaf_key(ROOT, p) in reference]
                self._compare(root, ref_leaves, dict(named_leaves(out)), name, "propagated")
        except Exception as e:
            where = f" (in {open_calls[-1]})" if open_calls else ""
            self.failures[name] = f"the model failed under {name}{where}: {_describe(e)}"
            return False
        return True


def _evidence(part: Callable[..., Any]) -> list[Any]:
    """What a backend recorded during the last run of ``part`` (strict: its overflow events,
    still on the device; read with the rest in :func:`_read`)."""
    events = getattr(getattr(part, "backend_fn", None), "events", None)
    return [events] if events is not None else []


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _read(session: _Session) -> tuple[list[ModuleError], list[InputStats]]:
    """One host read for every pending vector; build the typed results."""
    vectors = [p.vector for p in session.pending if p.vector is not None]
    host = _stats.to_host(vectors)
    stat_triples = [p.stats for p in session.pending if p.stats is not None]
    read_stats = _stats.read(stat_triples)
    input_stats = _stats.read([(d, s, v) for _, d, s, v in session.inputs])
    errors, vi, si = [], 0, 0
    for p in session.pending:
        metrics = stats = None
        if p.vector is not None:
            metrics = from_vector(host[vi])
            vi += 1
        if p.stats is not None:
            stats = read_stats[si]
            si += 1
        evidence = tuple(str(event) for recorded in p.evidence for event in recorded.events())
        errors.append(ModuleError(p.key, p.call.name, p.call.index, p.target, p.kind, metrics, stats, p.failure, evidence))
    inputs = [InputStats(key, s) for (key, _, _, _), s in zip(session.inputs, input_stats)]
    return errors, inputs


def report(
    model: nn.Module,
    inputs: Any,
    targets: Iterable[str] = DEFAULT_TARGETS,
    reference: str = "fp32",
    modules: Patterns | str = None,
    tol: float | dict[str, float] | None = None,
    metric: str = "rel_l2",
    local: bool = True,
    offload: bool = False,
) -> Report:
    """Find where and why ``model``'s output diverges under each target.

    ``inputs`` is a tensor, a tuple of positional args or a dict of kwargs. ``modules`` limits the
    per-module rows (``"leaves"`` or globs; the final output is always measured). ``tol`` is a
    bound on ``metric`` for the final output and for a module's local error (default per dtype:
    fp16 1e-2, bf16 5e-2 relative L2), a float or a dict by target string. ``offload=True`` keeps
    the reference copy of every module output in host memory instead of on the device.

        >>> rep = tp.report(model, x, targets=("eager:fp16", "strict:fp16"))
        >>> print(rep)                      # verdict per target, culprits, per-module table
        >>> rep.culprits[0].module, rep.culprits[0].reason
        ('encoder.norm', 'overflow')
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"report(model=...) takes an nn.Module; got {type(model).__name__}")
    get_metric(metric)
    ref_target = parse_target(reference)
    if not ref_target.is_reference:
        raise InvalidArgument(f"reference={reference!r} must be 'fp32' or 'fp64'")
    if isinstance(targets, str):
        targets = (targets,)
    parsed = [parse_target(t) for t in targets]
    if not parsed:
        raise InvalidArgument("targets= is empty; give at least one, e.g. ('strict:fp16',)")
    args, kwargs = as_call(inputs)
    session = _Session(model, args, kwargs, ref_target, parsed, module_filter(model, modules), local, offload)
    with torch.no_grad():
        ref = session.prepare()
        rec = session.reference_pass(ref)
        reference_tensors = rec.tensors
        for name, runner in list(session.runners.items()):
            session.propagated_pass(name, runner, reference_tensors)
    errors, input_stats = _read(session)
    rows = tuple(rec.rows)
    outcomes = []
    for target in parsed:
        name = str(target)
        t_tol = resolve_tol(tol, target, metric)
        final = [e for e in errors if e.target == name and e.kind == "propagated" and e.module == ROOT and e.call == 0]
        failure = session.failures.get(name)
        output_error = None
        if final and all(e.metrics is not None for e in final):
            output_error = worst_of(metric, [e.metrics for e in final])
        ok = failure is None and passes(metric, [e.metrics for e in final], t_tol)
        runner = session.runners.get(name)
        per_module = runner is not None and not runner.backend.compiles
        outcomes.append(TargetOutcome(name, t_tol, output_error, ok, failure, per_module))
    culprits = find_culprits(rows, input_stats, errors, outcomes, metric, {str(t): t for t in parsed})
    return Report(
        model=type(model).__name__,
        reference=str(ref_target) if ref_target.dtype != torch.float32 else "fp32",
        metric=metric,
        targets=tuple(str(t) for t in parsed),
        rows=rows,
        inputs=tuple(input_stats),
        errors=tuple(errors),
        outcomes=tuple(outcomes),
        culprits=tuple(culprits),
    )
