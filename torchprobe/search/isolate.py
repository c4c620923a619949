"""isolate(): each module alone under the target, fed its captured reference inputs.

Compiling backends (inductor, tensorrt) compile one module at a time, so fusion inside a module is
real and no engine layer has to be mapped back to a module. By default it is hierarchical: the
top-level blocks first, then only the children of blocks whose local error is above tolerance.
"""
from __future__ import annotations

import logging
import math
import traceback
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import distributed as _distributed
from ..capture import CapturedCall, capture_calls
from ..errors import InvalidArgument, NonFiniteReference
from ..localize import _quiet_unless_writer, check_inputs
from ..metrics import get_metric, measure, resolve_tol, worst_of
from ..names import ROOT, has_forward, leaf_names, module_names, submodule
from ..progress import progress
from ..results import IsolatedModule, Isolation
from ..targets import PrecisionPlan, Runner, build, parse_target
from ..tree import as_call, named_leaves, replay_copy

log = logging.getLogger(__name__)


def signature(args: tuple, kwargs: dict) -> tuple:
    return tuple((p, tuple(t.shape), t.dtype) for p, t in named_leaves((args, kwargs)))


def running_children(model: nn.Module, name: str) -> list[str]:
    """Children of ``name`` that run; containers without a forward (ModuleList/ModuleDict) are
    replaced by their own children."""
    names = module_names(model)
    out: list[str] = []
    for child in submodule(model, name).children():
        child_name = names[child].name
        if not has_forward(child):
            out.extend(running_children(model, child_name))
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
    group: Any = None,
    rank: int | None = 0,
) -> Isolation:
    """Run each chosen module alone under ``target`` on its captured reference inputs.

    ``modules``: ``None`` (hierarchical: top-level blocks, descending only into blocks above
    ``tol``), ``"blocks"`` (top-level blocks only), ``"leaves"`` (every leaf), or a list of names.
    Compiled modules are cached per (module, input shapes/dtypes); ``compilations`` counts them.
    Raises :class:`NonFiniteReference` when the reference output holds NaN/Inf. Under
    torch.distributed every rank of ``group`` (default: the world) runs it on its own inputs;
    each row is the worst over the ranks, so the table and the descent are the same everywhere
    (progress bars on rank ``rank`` only).

        >>> table = tp.isolate(model, x, target="strict-onnx:fp16")
        >>> print(table); table.culprits[0].module
        'encoder.layers.1.norm2'
    """
    m = get_metric(metric)
    parsed = parse_target(target)
    t_tol = resolve_tol(tol, parsed, m)
    group = _distributed.resolve_group(group)
    model = _distributed.copyable(model)  # FSDP2: a view whose copies stay sharded
    args, kwargs = as_call(inputs)
    check_inputs(model, args, kwargs, "isolate")
    ref = build(reference, model, args, kwargs)
    runner = build(parsed, model, args, kwargs)
    tops = running_children(ref.module, ROOT)
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
    with torch.no_grad(), _quiet_unless_writer(rank, group):
        while level:
            captured, output = capture_calls(ref, ref.module, set(level) | {ROOT}, args, kwargs)
            if passes_run == 0:
                require_finite(output, str(reference), group)
            passes_run += 1
            next_level: list[str] = []
            found = [_isolate_one(runner, item, cache, m.name, depth_of.get(item.call.name, 0))
                     for item in progress([c for c in captured if c.call.name != ROOT], desc=f"isolate {parsed}")]
            if group is not None:  # the worst over the ranks, so that every rank descends alike
                found = _distributed.merge_items(found, lambda r: r.key, lambda r: (r.failure is not None, m.badness(r.error)),
                                                 group, "isolate()")
            for row in found:
                rows.append(row)
                above = row.failure or not m.passes(row.error, t_tol)
                if hierarchical and above:
                    for child in running_children(ref.module, row.module):
                        if child not in depth_of:
                            depth_of[child] = depth_of.get(row.module, 0) + 1
                            next_level.append(child)
            level = next_level
    return Isolation(str(parsed), m.name, t_tol, tuple(rows), len(cache), passes_run)


def require_finite(output: Any, reference: str, group: Any = None) -> None:
    """Refuse to judge anything against a reference output that holds NaN/Inf (on any rank of
    ``group``: then every rank raises)."""
    if group is not None:
        try:
            require_finite(output, reference)
        except NonFiniteReference as e:
            _distributed.agree(e, group)
        else:
            _distributed.agree(None, group)
        return
    leaves = [(p, _distributed.local_view(t)[0]) for p, t in named_leaves(output)]  # DTensor: this rank's values
    bad = [(p, t) for p, t in leaves if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        path, t = bad[0]
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise NonFiniteReference(
            f"the {reference} reference output{' ' + path if path else ''} holds {nan} NaN / {inf} Inf: nothing can be "
            "verified against it; run tp.report(model, inputs) to find the module that first produces them")


def _isolate_one(runner: Runner, item: CapturedCall, cache: dict, metric: str, depth: int) -> IsolatedModule:
    name, key = item.call.name, item.call.key
    sig = (name, signature(item.args, item.kwargs))
    fresh = sig not in cache
    try:
        if fresh:
            cache[sig] = runner.part(name, item.args, item.kwargs)
        a, k = replay_copy((item.args, item.kwargs))
        out = cache[sig](*a, **k)
    except Exception as e:  # the user's module failing under the target is a finding
        log.info("%s failed under %s:\n%s", key, runner.target, traceback.format_exc())
        return IsolatedModule(name, key, item.call.module_type, depth, math.inf, None, f"{type(e).__name__}: {e}", fresh)
    ref_leaves = [(p, t) for p, t in named_leaves(item.output) if t.is_floating_point()]
    test = dict(named_leaves(out))
    metrics = [measure(t, test[p]) if p in test and test[p].shape == t.shape else None for p, t in ref_leaves]
    m = get_metric(metric)
    value = m.worst(math.inf if e is None else e[metric] for e in metrics)
    info = getattr(getattr(cache[sig], "backend_fn", None), "info", None)
    return IsolatedModule(name, key, item.call.module_type, depth, value, worst_of(m, metrics), None, fresh,
                          None if info is None else str(info))
