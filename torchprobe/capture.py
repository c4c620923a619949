"""record(): forward hooks on every module, one row per module call, statistics on device.

    >>> import torch, torchprobe as tp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True))
    >>> with tp.record(model) as rec:
    ...     _ = model(torch.ones(2, 4))
    >>> [row.key for row in rec.rows]
    ['0', '1', '(root)']
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from . import distributed as _distributed
from . import stats as _stats
from .io.dumps import save_dump
from .errors import InvalidArgument
from .formats import HEAVY_UNDERFLOW, LOW_HEADROOM_BITS
from .kinds import Risk as RiskKind
from .names import ROOT, CallKey, Patterns, has_forward, module_names, name_filter
from .stats import TensorStats
from .targets import build
from .tree import as_call, leaf_key, map_tensors, named_leaves, replay_copy


@dataclass(frozen=True)
class Call:
    """One call of one module: ``key`` is ``name`` for the first call, ``name#k`` after."""

    name: str
    index: int
    module_type: str

    @property
    def key(self) -> str:
        return str(CallKey(self.name, self.index))


BeforeHook = Callable[[Call, nn.Module, tuple, dict], None]
AfterHook = Callable[[Call, nn.Module, tuple, dict, Any], None]


class _Site:
    """One hooked module inside one :func:`module_calls`: its name, its call count, and its
    :class:`Call` objects by call index (each made once)."""

    __slots__ = ("name", "module_type", "count", "calls")

    def __init__(self, name: str, module_type: str) -> None:
        self.name, self.module_type, self.count = name, module_type, 0
        self.calls: list[Call] = []

    def call(self, index: int) -> Call:
        calls = self.calls
        while len(calls) <= index:
            # the frozen dataclass's own __init__ (three object.__setattr__ calls) costs 0.7 us a
            # module call; filling the instance dict directly makes the same object in 0.3 us
            call = object.__new__(Call)
            call.__dict__.update(name=self.name, index=len(calls), module_type=self.module_type)
            calls.append(call)
        return calls[index]


def _canonical_names(model: nn.Module) -> dict[nn.Module, str]:
    """Every module of ``model`` by identity, under its canonical name: the first name
    ``named_modules(remove_duplicate=False)`` gives it, ``(root)`` for the root (the names of
    :func:`~torchprobe.names.module_names`, without its alias lists: one walk, ~0.2 us per
    module against ~2 us). A module met again is not walked again: everything below it already
    has its first name."""
    names: dict[nn.Module, str] = {}
    stack: list[tuple[nn.Module, str]] = [(model, "")]
    pop, push = stack.pop, stack.append
    while stack:
        module, name = pop()
        if module in names:
            continue
        names[module] = name or ROOT
        children = module._modules
        if children:
            prefix = name + "." if name else ""
            for child_name, child in reversed(children.items()):
                if child is not None:
                    push((child, prefix + child_name))
    return names


@contextlib.contextmanager
def module_calls(
    model: nn.Module,
    keep: Callable[[str], bool],
    *,
    before: BeforeHook | None = None,
    after: AfterHook | None = None,
    per_module: bool = False,
) -> Iterator[Counter]:
    """Hook every kept module; call ``before``/``after`` with a :class:`Call` per module call.

    Every handle is owned by one ExitStack and removed on exit, also when the forward raises.
    Yields the call counts by module name.

    With ``after`` alone, one process-wide forward hook serves every module: adding and removing
    it costs O(1) instead of two handles per module (1.5 ms for 200 modules), each call runs one
    hook instead of two, and modules of other models are skipped by identity. A call's index then
    counts finished calls of its module, the same as started calls unless a module calls itself.
    ``per_module=True`` registers hooks on each kept module even then: nothing runs for the
    modules of other models (a training loop's teacher, EMA or loss modules, torchprobe's own
    copies), and the hooks show in each module's ``_forward_hooks``. The process-wide hook's own
    work per call is two dict lookups and a counter update before ``after``.
    """
    counts: Counter = Counter()
    names = _canonical_names(model)
    if before is None and not per_module:
        sites: dict[nn.Module, _Site | None] = {}  # filled on each module's first call
        get = sites.get

        def post_only(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            site = get(module, False)
            if site is False:  # first call of this module in this context
                name = names.get(module)
                site = sites[module] = _Site(name, type(module).__name__) if name is not None and keep(name) else None
            if site is None:  # not kept, or a module of another model
                return
            index = site.count
            site.count = counts[site.name] = index + 1
            if after is not None:
                calls = site.calls
                after(calls[index] if index < len(calls) else site.call(index), module, args, kwargs, output)

        with nn.modules.module.register_module_forward_hook(post_only, with_kwargs=True):
            yield counts
        return

    open_calls: dict[str, list[Call]] = {}

    def make_hooks(site: _Site):
        name = site.name
        stack = open_calls.setdefault(name, [])

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            index = site.count
            site.count = counts[name] = index + 1
            call = site.call(index)
            stack.append(call)
            if before is not None:
                before(call, module, args, kwargs)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            call = stack.pop()
            if after is not None:
                after(call, module, args, kwargs, output)

        return pre, post

    with contextlib.ExitStack() as stack:
        for module, name in names.items():
            if not keep(name):
                continue
            pre, post = make_hooks(_Site(name, type(module).__name__))
            stack.enter_context(module.register_forward_pre_hook(pre, with_kwargs=True))
            stack.enter_context(module.register_forward_hook(post, with_kwargs=True))
        yield counts


@dataclass(frozen=True, kw_only=True)
class Row(TensorStats):
    """Statistics of one floating (or counted integer) tensor leaf of one module call."""

    key: str
    module: str
    call: int
    leaf: str
    module_type: str


@dataclass(frozen=True)
class Risk:
    """A row that is at risk in FP16, and why (``overflow``, ``nan``, ``low-headroom``, ``underflow``)."""

    key: str
    kind: RiskKind
    detail: str


def risks(row: TensorStats, key: str) -> list[Risk]:
    """What makes one tensor unsafe in FP16."""
    if not row.is_floating:
        return []
    found = []
    if row.nan:
        found.append(Risk(key, RiskKind.NAN, f"{row.nan} NaN"))
    if row.inf or row.beyond_fp16:
        found.append(Risk(key, RiskKind.OVERFLOW, f"{row.beyond_fp16} finite values beyond 65504, {row.inf} Inf (absmax {row.absmax:.4g})"))
    elif row.headroom_bits is not None and row.headroom_bits < LOW_HEADROOM_BITS:
        found.append(Risk(key, RiskKind.LOW_HEADROOM, f"absmax {row.absmax:.4g}: {row.headroom_bits:.2f} bits below FP16 max"))
    finite = row.numel - row.nonfinite
    if finite and row.flush_fp16 / finite > HEAVY_UNDERFLOW:
        found.append(Risk(key, RiskKind.UNDERFLOW, f"{row.flush_fp16 / finite:.1%} of values flush to zero in FP16"))
    return found


class _Pending(tuple):
    """One recorded tensor leaf awaiting the read, a plain tuple (the hook makes one per tensor):
    (dtype, shape, summary, key, module, call index, leaf path, module type)."""

    __slots__ = ()
    dtype = property(itemgetter(0))
    shape = property(lambda self: tuple(self[1]))  # a torch.Size in the tuple, a plain tuple out
    vector = property(itemgetter(2))
    key = property(itemgetter(3))
    module = property(itemgetter(4))
    call = property(itemgetter(5))
    leaf = property(itemgetter(6))
    module_type = property(itemgetter(7))


def _row(stats: TensorStats, p: Any) -> Row:
    """A Row from one statistics result and its pending entry, without the dataclass __init__
    (a frozen dataclass's constructor costs ~4 us a row: ~1 ms a forward on a ResNet-50)."""
    row = object.__new__(Row)
    d = row.__dict__
    d.update(vars(stats))
    d["key"], d["module"], d["call"], d["leaf"], d["module_type"] = p.key, p.module, p.call, p.leaf, p.module_type
    return row


class Recording:
    """What :func:`record` saw: rows in the order modules returned, and captured tensors."""

    def __init__(self, model: nn.Module, keep: Callable[[str], bool], capture: bool, offload: bool, fused: bool | None):
        self._model = weakref.ref(model)
        self._keep = keep
        self.capture = capture
        self.offload = offload
        self._summarize = _distributed.summarizer(fused)  # a Summarizer; DTensor-aware under torch.distributed
        self.group: Any = None  # the process group rows are merged over (record(group=...)); None: this process
        self._run: int | None = None  # the merge's run token, shared by the per-rank dumps of one recording
        self._pending: list[_Pending] = []
        self._rows: list[Row] | None = None
        self._tensors: dict[str, Tensor] = {}
        self._seen: dict[int, tuple[weakref.ref, int, Tensor | None, Tensor | None]] = {}
        self.calls: Counter = Counter()

    # -- hook side -------------------------------------------------------------------------
    def summarize(self, t: Tensor) -> Any:
        """An on-device summary of ``t`` (read later with the rows, in one host read)."""
        return self._summarize(t)

    def summary(self, t: Tensor, copy: bool = True) -> tuple[Any, Tensor | None]:
        """Summary vector (and captured copy) of ``t``, reused when the very same tensor object
        in the same version was seen already (a container returning its child's output)."""
        keep = copy and self.capture
        if t.is_inference():  # no version counter: never reused
            return (self._summarize(t) if t.is_floating_point() else None), (self._copy(t) if keep else None)
        version = t._version
        key = id(t)
        hit = self._seen.get(key)
        if hit is not None and hit[1] == version and hit[0]() is t and (hit[3] is not None or not keep):
            return hit[2], hit[3]
        vector = self._summarize(t) if t.is_floating_point() else None
        kept = self._copy(t) if keep else None
        self._seen[key] = (weakref.ref(t), version, vector, kept)
        return vector, kept

    def _copy(self, t: Tensor) -> Tensor:
        t = t.detach()
        if self.offload and t.device.type != "cpu":
            return t.to("cpu", non_blocking=True)
        return t.clone()

    def observe(self, call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The after-hook: summarize (and capture) every tensor leaf of one module call's output."""
        self._rows = None
        name, index = call.name, call.index
        key = name if index == 0 else call.key  # Call.key: the name alone for a first call
        if isinstance(output, Tensor):  # the common case: one tensor, no tree to walk
            vector, copy = self.summary(output)
            self._pending.append(_Pending((output.dtype, output.shape, vector, key, name, index, "", call.module_type)))
            if copy is not None:
                self._tensors[key] = copy
            return
        for path, t in named_leaves(output):
            vector, copy = self.summary(t)
            leaf = leaf_key(key, path)
            self._pending.append(_Pending((t.dtype, t.shape, vector, leaf, name, index, path, call.module_type)))
            if copy is not None:
                self._tensors[leaf] = copy

    # -- query side ------------------------------------------------------------------------
    @property
    def rows(self) -> list[Row]:
        """One row per tensor leaf per module call, in the order the modules returned.

        With a process group (``record(group=...)`` under torch.distributed) the rows are merged
        when the block exits; reading them earlier, inside the block, is a collective: every rank
        of the group must read at the same point."""
        if self._rows is None:
            entries = [(p.dtype, p.shape, p.vector) for p in self._pending]
            if self.group is not None:  # collective: every rank of the group reads here
                read, self._run = _distributed.merged_stats(entries, [p.key for p in self._pending], self.group,
                                                            getattr(self._summarize, "layout", None))
            else:
                read = _stats.read(entries)
            self._rows = [_row(s, p) for p, s in zip(self._pending, read)]
        return self._rows

    def __getitem__(self, key: str) -> Row:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"no row {key!r}; keys look like {', '.join(r.key for r in self.rows[:3])} ...")

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Captured output tensors by row key (``capture=True`` only)."""
        if not self.capture:
            raise InvalidArgument("record(..., capture=False) keeps statistics only; pass capture=True to keep tensors")
        if any(t.device.type == "cpu" and t.is_pinned() for t in self._tensors.values()):
            torch.cuda.synchronize()
        return dict(self._tensors)

    def unvisited(self) -> list[str]:
        """Modules that were hooked but never ran (pure containers such as ModuleList excepted)."""
        model = self._model()
        if model is None:
            return []
        names = [n.name for m, n in module_names(model).items() if self._keep(n.name) and has_forward(m)]
        return [n for n in names if self.calls[n] == 0]

    def at_risk(self) -> list[Risk]:
        return [risk for row in self.rows for risk in risks(row, row.key)]

    def save(self, path: str | Path, target: str = "fp32") -> Path:
        """Write the captured tensors to a safetensors dump (atomically).

        Under torch.distributed (``record(group=...)``) every rank of the group must call it: each
        writes its own values to ``<name>.rank<r>.safetensors`` with its rank, the world size and
        the run in the metadata, and returns that path; ``tp.compare`` merges the set."""
        tensors = self.tensors
        order = [r.key for r in self.rows if r.key in tensors]
        if self.group is None:
            return save_dump(path, tensors, target=target, order=order)
        local, layout = _distributed.local_tensors({k: tensors[k] for k in order}, self.group)
        r, world = _distributed.rank(self.group), _distributed.world_size(self.group)
        return save_dump(_distributed.rank_path(path, r), local, target=target, order=order,
                         ranks={"rank": r, "world_size": world, "run": f"{self._run:x}", **layout})

    def __str__(self) -> str:
        from .render.text import recording_table

        return recording_table(self)


@contextlib.contextmanager
def record(
    model: nn.Module,
    include: Patterns = None,
    exclude: Patterns = None,
    capture: bool = False,
    offload: bool = False,
    fused: bool | None = None,
    group: Any = None,
) -> Iterator[Recording]:
    """Record per-module output statistics (and tensors, with ``capture=True``) around any code
    that calls ``model``: inference, a training step, under autocast or not.

    ``include``/``exclude`` are globs over qualified module names (the root is ``(root)``).
    ``offload=True`` moves captured tensors to host memory as they are produced. ``fused``
    chooses the one-kernel statistics reduction (default: on CUDA). Every hook is removed on exit,
    also when the body raises; the model is never modified.

    Under torch.distributed, ``rec.rows`` are statistics of the whole logical tensor across the
    ranks of ``group`` (default: the world; ``False``: this rank only), merged once when the
    block exits (:mod:`torchprobe.distributed`): every rank must run the block, with the same
    modules in the same order. Plain tensors count as each rank's own data (DDP, FSDP2), DTensors
    by their placements. ``shape`` is the logical shape of a DTensor, this rank's of a plain
    tensor; ``numel`` counts the group.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"record(model=...) takes an nn.Module; got {type(model).__name__}")
    group = _distributed.resolve_group(group)
    with recording(model, name_filter(include, exclude), capture=capture, offload=offload, fused=fused) as rec:
        rec.group = group
        try:
            yield rec
        except BaseException:
            rec.group = None  # a rank that failed cannot meet the others in a collective: local rows
            raise
    if group is not None:
        _ = rec.rows  # the one merge, at the same point on every rank


@contextlib.contextmanager
def recording(
    model: nn.Module,
    keep: Callable[[str], bool],
    *,
    capture: bool = False,
    offload: bool = False,
    fused: bool | None = None,
    before: BeforeHook | None = None,
    after: AfterHook | None = None,
) -> Iterator[Recording]:
    """The one capture API: a :class:`Recording` of every kept module call, plus optional
    ``before``/``after`` callbacks that run around each call (``after`` runs once the call's
    output is recorded). report(), isolate(), bisect() and Monitor build on it.
    """
    rec = Recording(model, keep, capture, offload, fused)

    def observe_then(call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        rec.observe(call, module, args, kwargs, output)
        if after is not None:
            after(call, module, args, kwargs, output)

    try:
        with module_calls(model, keep, before=before, after=observe_then) as counts:
            rec.calls = counts
            yield rec
    finally:
        rec._seen.clear()


def dump(model: nn.Module, inputs: Any, path: str | Path, target: str = "fp32", include: Patterns = None,
         exclude: Patterns = None) -> Path:
    """Run ``model`` (a private copy) under ``target`` once and save every module output.

    Keys are the row keys of :func:`record`. For compiling backends (inductor, tensorrt) only the
    final output exists as a module output.

        >>> tp.dump(model, x, "fp32.safetensors")
        >>> tp.dump(model, x, "strict.safetensors", target="strict:fp16")
        >>> print(tp.compare("fp32.safetensors", "strict.safetensors"))
    """
    args, kwargs = as_call(inputs)
    runner = build(target, _distributed.copyable(model), args, kwargs)
    with torch.no_grad(), record(runner.module, include=include, exclude=exclude, capture=True, offload=True) as rec:
        runner(*args, **kwargs)
    return rec.save(path, target=str(runner.target) if not runner.target.is_reference else str(target))


@dataclass
class CapturedCall:
    """One module call's inputs (copied before it ran) and output, from a reference pass."""

    call: Call
    args: tuple
    kwargs: dict
    output: Any


def capture_calls(run: Callable[..., Any], model: nn.Module | None = None, names: Any = None, args: tuple = (),
                  kwargs: dict | None = None) -> tuple[list[CapturedCall], Any]:
    """Run ``run(*args, **kwargs)`` once and keep, for every call of a module in ``names`` (of
    ``model``, default ``run.module``), private copies of its inputs (taken before it ran, so
    in-place ops cannot change them) and of its output. Returns the calls in the order they
    returned, and the run's output."""
    model = run.module if model is None else model
    kwargs = kwargs or {}
    captured: dict[str, CapturedCall] = {}
    order: list[str] = []

    def before(call: Call, module: nn.Module, a: tuple, k: dict) -> None:
        a, k = replay_copy((a, k))
        captured[call.key] = CapturedCall(call, a, k, None)

    def after(call: Call, module: nn.Module, a: tuple, k: dict, out: Any) -> None:
        captured[call.key].output = map_tensors(out, lambda t: t.detach().clone())
        order.append(call.key)

    a, k = replay_copy((args, kwargs))
    with module_calls(model, lambda n: n in names, before=before, after=after):
        output = run(*a, **k)
    return [captured[key] for key in order], output
