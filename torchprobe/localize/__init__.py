"""report(): where and why a model's output diverges under each target.

The passes (reference with shadow runs, propagated per target) are in :mod:`.passes`; from their
measurements :mod:`.culprits` names the culprits, the latent findings, and, when the reference
itself is not finite, the module where NaN/Inf first appears.

Cost: the reference forward, about one forward per target for the shadows (a container runs its
own code with its children answered by the reference, :mod:`.passes`), one propagated forward per
target, and a subtree pass only for a divergence that no module's own error explains. Peak memory:
one copy of the model per target (plus a reference copy unless the model already is an FP32 eval
model), one copy of every module output of the reference (in host memory with ``offload=True``),
and the live activations of one forward at a time.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .. import distributed as _distributed
from ..errors import InvalidArgument, TorchprobeError
from ..kinds import ErrorKind
from ..metrics import all_pass, get_metric, resolve_tol, worst_of
from ..names import ROOT, Patterns, leaf_names, name_filter
from ..progress import progress, quiet
from ..results import InputStats, Report, TargetOutcome
from ..targets import parse_target
from ..tree import as_call, named_leaves
from .culprits import find_findings, reference_origin
from .passes import Session

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("autocast:fp16", "eager:fp16", "strict:fp16")


def module_filter(model: nn.Module, modules: Patterns | str) -> Callable[[str], bool]:
    """``None`` (all), ``"leaves"``, or globs; the root is always kept (it is the final output)."""
    if modules == "leaves":
        leaves = set(leaf_names(model))
        return lambda name: name == ROOT or name in leaves
    keep = name_filter(modules)
    return lambda name: name == ROOT or keep(name)


def check_inputs(model: nn.Module, args: tuple, kwargs: dict, caller: str) -> None:
    """Refuse models and inputs that no target can run: not a module, or on the meta device."""
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"{caller}(model=...) takes an nn.Module; got {type(model).__name__}")
    for what, tensors in (("model", [*model.parameters(), *model.buffers()]),
                          ("inputs", [t for _, t in named_leaves((args, kwargs))])):
        devices = {t.device.type for t in tensors}
        if "meta" in devices:
            raise TorchprobeError(f"{caller}(): the {what} are on the 'meta' device, which holds no values; "
                                  "torchprobe measures real numbers: materialize them (e.g. model.to_empty(device='cpu') "
                                  "and load weights) and pass inputs on 'cpu' or 'cuda'")


def floating_output_check(output: Any, caller: str) -> None:
    if not any(t.is_floating_point() for _, t in named_leaves(output)):
        kinds = sorted({str(t.dtype) for _, t in named_leaves(output)}) or [type(output).__name__]
        raise TorchprobeError(f"{caller}(): the model returned no floating tensor; torchprobe compares floating "
                              f"outputs (got {', '.join(kinds)}): return the logits or activations to check")


def _quiet_unless_writer(rank: int | None, group: Any):
    return quiet() if group is not None and not _distributed.is_writer(rank, group) else contextlib.nullcontext()


def _merge_ranks(session: Session, rec: Any, errors: list, metric: Any, group: Any) -> tuple[list, list]:
    """Merge one report's per-rank measurements over ``group``: reference rows and input
    statistics of the whole logical tensors, each error the worst over the ranks, failures
    united (``session.failures`` and ``session.shadow_failures`` are updated)."""
    rec.group = group  # rec.rows now merge across the ranks
    entries = [(d, s, v) for _, d, s, v in session.inputs]
    merged, _ = _distributed.merged_stats(entries, [k for k, _, _, _ in session.inputs], group,
                                          getattr(rec._summarize, "layout", None), "report() inputs")
    inputs = [InputStats(key, s) for (key, _, _, _), s in zip(session.inputs, merged)]

    def badness(e: Any) -> tuple:
        if e.metrics is None:
            return (1, math.inf)
        return (0 if e.metrics.finite else 1, metric.badness(e.metrics[metric.name]))

    errors = _distributed.merge_items(errors, lambda e: (e.key, e.target, e.kind.value), badness, group, "report()")
    session.failures = _distributed.merge_failures(session.failures, group)
    shadows = _distributed.gather_objects(session.shadow_failures, group)
    united = {}
    for lst in shadows:
        for f in lst:
            united.setdefault((f.target, f.call.key), f)
    session.shadow_failures = list(united.values())
    return errors, inputs


def report(
    model: nn.Module,
    inputs: Any,
    targets: Iterable[str] = DEFAULT_TARGETS,
    reference: str = "fp32",
    modules: Patterns | str = None,
    tol: float | Mapping[str, float] | None = None,
    metric: str = "rel_l2",
    local: bool = True,
    offload: bool = False,
    margins: bool = False,
    group: Any = None,
    rank: int | None = 0,
) -> Report:
    """Find where and why ``model``'s output diverges under each target.

    ``inputs`` is a tensor, a tuple of positional args or a dict of kwargs. ``modules`` limits the
    per-module rows (``"leaves"`` or globs; the final output is always measured). ``tol`` bounds
    ``metric`` for the final output and for a module's local error (default per dtype: fp16 1e-2,
    bf16 5e-2 relative L2; cosine must reach ``1 - tol``, SQNR ``tol`` dB), a float or a dict by
    target string. ``offload=True`` keeps the reference copy of every module output in host memory.
    ``margins=True`` also measures :func:`~torchprobe.localize.margin.margin` per leaf module under
    each target (how much its inputs may grow before it breaks): a column in the table, a line in
    the HTML headroom plot, ``rep.margins[target][module]``.

    Under torch.distributed every rank of ``group`` (default: the world; ``False``: this rank
    alone) calls it with its own inputs and runs its own copies; statistics are merged across
    the ranks, each error is the worst over the ranks, so verdicts and culprits are global and
    the same on every rank. Progress bars show on rank ``rank`` only (None: every rank).

        >>> rep = tp.report(model, x, targets=("eager:fp16", "strict-onnx:fp16"))
        >>> print(rep)                      # verdict per target, culprits, latent findings, table
        >>> rep.culprits[0].module, rep.culprits[0].reason
        ('encoder.layers.1.norm2', <Reason.OVERFLOW: 'overflow'>)
    """
    m = get_metric(metric)
    group = _distributed.resolve_group(group)
    model = _distributed.copyable(model)  # FSDP2: a view whose copies stay sharded
    args, kwargs = as_call(inputs)
    check_inputs(model, args, kwargs, "report")
    ref_target = parse_target(reference)
    if not ref_target.is_reference:
        raise InvalidArgument(f"reference={reference!r} must be 'fp32' or 'fp64'")
    if isinstance(targets, str):
        targets = (targets,)
    parsed = [parse_target(t) for t in targets]
    if not parsed:
        raise InvalidArgument("targets= is empty; give at least one, e.g. ('strict:fp16',)")
    tols = {str(t): resolve_tol(tol, t, m, targets=[str(p) for p in parsed]) for t in parsed}
    session = Session(model, args, kwargs, ref_target, parsed, module_filter(model, modules), local, offload)
    with torch.no_grad(), _quiet_unless_writer(rank, group):
        session.prepare()
        leaves = set(leaf_names(session.ref_runner.module))
        steps = progress([None, *session.runners], desc="report passes")
        for name in steps:
            if name is None:
                rec = session.reference_pass()
                floating_output_check(session.root_output, "report")
                session.release_reference()
                reference_tensors = rec.tensors
            else:
                session.propagated_pass(name, session.runners[name], reference_tensors)
        del reference_tensors
    errors, input_stats = session.read()
    if group is not None:  # the merge step: the same rows, errors and failures on every rank
        errors, input_stats = _merge_ranks(session, rec, errors, m, group)
    rows = tuple(rec.rows)
    ref_name = "fp32" if ref_target.dtype == torch.float32 else str(ref_target).split(":")[-1]
    root_rows = [r for r in rows if r.module == ROOT and r.call == 0 and r.is_floating]
    reference_finite = all(r.nonfinite == 0 for r in root_rows)

    outcomes = _outcomes(session, parsed, errors, m, tols, reference_finite, ref_name)
    culprits, latent, ignored = _findings(session, rows, input_stats, errors, outcomes, m, parsed, leaves, reference_finite,
                                          ref_name, model)
    unexplained = [o.target for o in outcomes if not o.passed and o.failure is None and local
                   and not any(c.target == o.target for c in culprits)]
    if unexplained:  # no module's own error explains it: measure the containers' subtrees (passes.py, step 3)
        with torch.no_grad(), _quiet_unless_writer(rank, group):
            session.subtree_pass(unexplained)
        errors, input_stats = session.read()
        if group is not None:
            errors, input_stats = _merge_ranks(session, rec, errors, m, group)
        culprits, latent, ignored = _findings(session, rows, input_stats, errors, outcomes, m, parsed, leaves,
                                              reference_finite, ref_name, model)
    replay_failures = []
    for f in session.shadow_failures:
        if (f.target, f.call.key) in ignored:
            log.warning("torchprobe could not replay %s alone under %s (the whole model runs under it): %s\n%s",
                        f.call.key, f.target, f.message, f.traceback)
            replay_failures.append(f"{f.call.key} under {f.target}: {f.message}")
    measured = None
    if margins and reference_finite:
        from .margin import margin

        measured = {}
        for target in parsed:
            if session.failures.get(str(target)) is None:
                mg = margin(model, inputs, target, tol=tols[str(target)], metric=m.name, reference=reference)
                measured[str(target)] = {row.module: row.factor for row in mg.rows}
        if group is not None:  # the weakest over the ranks, the same on every rank
            every = _distributed.gather_objects(measured, group)
            measured = {t: {k: min(d.get(t, {}).get(k, math.inf) for d in every) for k in f} for t, f in measured.items()}
    return Report(
        model=type(model).__name__,
        reference=ref_name,
        metric=m.name,
        targets=tuple(str(t) for t in parsed),
        rows=rows,
        inputs=tuple(input_stats),
        errors=tuple(errors),
        outcomes=tuple(outcomes),
        culprits=tuple(culprits),
        latent=tuple(latent),
        reference_finite=reference_finite,
        replay_failures=tuple(replay_failures),
        margins=measured,
    )


def _outcomes(session: Session, parsed: list, errors: list, m: Any, tols: dict, reference_finite: bool,
              ref_name: str) -> list[TargetOutcome]:
    outcomes = []
    for target in parsed:
        name = str(target)
        final = [e for e in errors if e.target == name and e.kind == ErrorKind.PROPAGATED and e.module == ROOT and e.call == 0]
        failure = session.failures.get(name)
        if not reference_finite:
            failure = f"the {ref_name} reference is not finite: its output holds NaN/Inf, so nothing can be judged against it"
        output_error = worst_of(m, [e.metrics for e in final]) if final and all(e.metrics is not None for e in final) else None
        ok = failure is None and all_pass(m, [e.metrics for e in final], tols[name])
        runner = session.runners.get(name)
        per_module = runner is not None and not runner.backend.compiles
        outcomes.append(TargetOutcome(name, tols[name], output_error, ok, failure, per_module))
    return outcomes


def _findings(session: Session, rows: tuple, input_stats: list, errors: list, outcomes: list, m: Any, parsed: list,
              leaves: set[str], reference_finite: bool, ref_name: str, model: nn.Module) -> tuple[list, list, set]:
    """(culprits, latent, replays that failed where the whole model ran under the target)."""
    # the whole model ran under the target: the replay failed, not the module
    ignored = {(f.target, f.call.key) for f in session.shadow_failures if f.target not in session.failures}
    if reference_finite:
        culprits, latent = find_findings(rows, input_stats, errors, outcomes, m, {str(t): t for t in parsed}, leaves, ignored)
    else:
        # the user's model holds the same parameters as the reference copy; they are only read
        culprits, latent = reference_origin(rows, input_stats, ref_name, model), []
    return culprits, latent, ignored
