"""The passes of one report(): the reference pass with shadow runs, then one propagated pass per target.

Every target runs on a private copy of the model, and every replay (shadow, propagated) runs on
its own copy of the inputs, mutable non-tensor objects (a transformers Cache, dicts) included, so
a target's figures do not depend on which other targets ran, or in which order. The reference
runs on a private copy too: the user's model is never run.

1. **Reference pass** (eager FP32, or FP64): per-module input and output statistics and a copy of
   every output (on the device, or in host memory with ``offload=True``). When a module call
   returns, a **shadow** run executes the same module of each target's copy on a copy of the
   reference's exact inputs (taken before the call): the error it shows is the error that module
   *introduces*.

   - A module call in which no other kept module was called (a leaf) runs whole.
   - A container runs its own code only: every kept module it calls is answered with the
     reference's output of that call, rounded to the dtype that module returns under the target.
     Its local error is then the error of its own arithmetic (a residual add, attention written
     in functional ops, a layer scale), measured on its outputs and on every value its code hands
     to a child (keys ``block:->block.norm2:0.0``: the input ``0.0`` of the child call
     ``block.norm2``). A child input that the target dtype cannot hold in the reference (NaN/Inf,
     or beyond the dtype's range, e.g. an FP32 attention mask of ``finfo.min``) is not compared:
     the child's own shadow meets it.
   - A container whose calls do not replay that way (it calls its children differently, or
     raises with their answers) runs whole, like a leaf.

   So the shadows of all modules together run about one forward per target, however deep the
   nesting (running every container whole cost one forward per target per nesting level).
   Compiling backends (inductor, tensorrt) compile and run each module whole.
2. **Propagated pass** per target: the whole model under the target; each module's output is
   compared with the reference copy from step 1. Compiling backends are run whole and only their
   final output is compared; their per-module view is the local error.
3. **Subtree pass**, only for a target whose final output diverges while no module's own error
   explains it (errors below tolerance everywhere that add up, or one amplified inside a
   container): the reference runs once more and each container runs whole under that target on
   its exact inputs, so the smallest container whose subtree introduces the error is named. Its
   figures replace the container's own-arithmetic figures for that target.

A comparison already made is reused where the very same pair comes again (a module passing a
tensor on unchanged: Dropout, Identity, a container returning its child's output).
"""
from __future__ import annotations

import copy
import logging
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import stats as _stats
from ..capture import Call, Recording, module_calls, recording
from ..errors import UnsupportedTarget
from ..kinds import ErrorKind
from ..metrics import error_vector, from_vector
from ..names import ROOT, submodule
from ..results import BackendEvent, InputStats, ModuleError
from ..targets import Runner, Target, build
from ..targets.base import model_device
from ..tree import leaf_key, map_tensors, named_leaves, replay_copy

log = logging.getLogger(__name__)

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class _Pending:
    """Device-side measurements awaiting one host read."""

    call: Call
    key: str
    target: str
    kind: ErrorKind
    vector: Tensor | None = None
    stats: tuple[torch.dtype, tuple[int, ...], Any] | None = None
    failure: str | None = None
    events: list[Any] = field(default_factory=list)
    # A child input's comparison counts only when the reference input (key) fits this dtype.
    guard: tuple[str, torch.dtype] | None = None


@dataclass
class ShadowFailure:
    """A module that raised when run alone under a target, with its full traceback."""

    call: Call
    target: str
    message: str
    traceback: str


@dataclass
class _Child:
    """A finished kept call inside an open call: what the parent's shadow needs from it."""

    call: Call
    inputs: dict[str, Tensor]  # reference copies of its tensor inputs, by leaf path
    output: Any  # its output, tensor leaves replaced by the reference copies
    dtypes: dict[str, dict[str, torch.dtype]] = field(default_factory=dict)  # target -> leaf -> dtype alone


@dataclass
class _Frame:
    """An open kept call of the reference pass."""

    call: Call
    snapshot: tuple[tuple, dict]  # (args, kwargs) as they came, tensors replaced by reference copies
    inputs: dict[str, Tensor]  # the same reference copies, by leaf path
    children: list[_Child] = field(default_factory=list)


class _Mismatch(Exception):
    """The container called its children differently than in the reference run."""


class Session:
    """One report(): the reference pass with shadows, then a propagated pass per target."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, reference: Target, targets: list[Target],
                 keep: Callable[[str], bool], local: bool, offload: bool):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.reference, self.targets, self.keep, self.local = reference, targets, keep, local
        self.offload = offload
        self.pending: list[_Pending] = []
        self.inputs: list[tuple[str, torch.dtype, tuple, Any]] = []
        self.failures: dict[str, str] = {}
        self.shadow_failures: list[ShadowFailure] = []
        self.runners: dict[str, Runner] = {}
        self.ref_runner: Runner | None = None
        self.recording: Recording | None = None
        self.devices: dict[str, torch.device] = {}  # where each target's copy runs
        self.containers: set[str] = set()  # call keys whose shadow ran their own code only
        self._fns: dict[tuple[str, str], Callable[..., Any]] = {}
        self._modules: dict[tuple[str, str], nn.Module] = {}
        self._frames: list[_Frame] = []
        self._copies: dict[int, tuple[weakref.ref, int, Tensor]] = {}
        # Comparisons already made, reused where the very same pair comes again: a module passing a
        # tensor on unchanged (Dropout, Identity, a container returning its child's output).
        self._sources: dict[int, tuple[Tensor, int | None, Tensor]] = {}  # replay tensor -> (it, version, reference copy)
        self._rounding: dict[tuple[str, int, torch.dtype], tuple[weakref.ref, Any, Any]] = {}

    # -- building ---------------------------------------------------------------------------
    def prepare(self) -> None:
        self.ref_runner = self._reference_runner()
        for target in self.targets:
            try:
                runner = self.runners[str(target)] = build(target, self.model, self.args, self.kwargs)
                self.devices[str(target)] = model_device(runner.module, *runner.example)
            except UnsupportedTarget as e:
                self.failures[str(target)] = str(e)

    def _reference_runner(self) -> Runner:
        """A private copy of the model for the reference: the user's model is never run by
        torchprobe (its own observer hooks would fire; every replay runs on its own copies)."""
        return build(self.reference, self.model, self.args, self.kwargs)

    def release_reference(self) -> None:
        """Drop the reference copy of the model (the propagated passes do not need it; a subtree
        pass builds it again)."""
        self.ref_runner = None

    # -- reference pass ---------------------------------------------------------------------
    def reference_pass(self) -> Recording:
        ref = self.ref_runner
        try:
            with recording(ref.module, self.keep, capture=True, offload=self.offload,
                           before=self._before, after=self._after) as rec:
                self.recording = rec
                a, k = replay_copy((self.args, self.kwargs))
                self.root_output = ref(*a, **k)
        finally:
            self._frames.clear()
            self._copies.clear()
            self._rounding.clear()
        return rec

    def _before(self, call: Call, module: nn.Module, args: tuple, kwargs: dict) -> None:
        leaves = _leaves(args, kwargs)
        for path, t in leaves:
            vector = self.recording.summary(t, copy=False)[0]
            self.inputs.append((leaf_key(call.key, path), t.dtype, tuple(t.shape), vector))
        if not self.local or call.name == ROOT:
            return
        memo = {id(t): self._reference_copy(t) for _, t in leaves}
        snapshot = _copy_structure((args, kwargs), memo)
        self._frames.append(_Frame(call, snapshot, {p: memo[id(t)] for p, t in leaves}))

    def _after(self, call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        leaves = named_leaves(output)
        copies = {}
        for _, t in leaves:
            kept = self.recording.summary(t)[1]  # the copy the recording just took (no new copy)
            if kept is not None:
                copies[id(t)] = kept
                if not t.is_inference():
                    self._copies[id(t)] = (weakref.ref(t), t._version, kept)
        if not self.local or call.name == ROOT:
            return
        frame = self._frames.pop()
        if frame.call != call:  # pragma: no cover - module_calls pairs every before with its after
            raise RuntimeError(f"torchprobe: call {call.key} returned while {frame.call.key} was open")
        child = _Child(call, frame.inputs, None)
        for name, runner in self.runners.items():
            child.dtypes[name] = self._shadow(name, runner, frame, leaves, copies)
        if self._frames:
            child.output = _copy_structure(output, copies)
            self._frames[-1].children.append(child)

    def _reference_copy(self, t: Tensor) -> Tensor:
        """The reference's copy of a tensor: the recording's copy when ``t`` is a module output
        not changed since, else a private clone (an intermediate of some module's own code)."""
        hit = self._copies.get(id(t))
        if hit is not None and hit[0]() is t and not t.is_inference() and hit[1] == t._version:
            return hit[2]
        return t.detach().clone()

    # -- shadows ----------------------------------------------------------------------------
    def _shadow(self, name: str, runner: Runner, frame: _Frame, ref_leaves: Sequence[tuple[str, Tensor]],
                copies: dict[int, Tensor]) -> dict[str, torch.dtype]:
        """Run ``frame``'s module alone under one target; record its local error. Returns the
        dtypes of its output leaves under the target (what its parent's shadow feeds on)."""
        try:
            return self._shadow_once(name, runner, frame, ref_leaves, copies)
        finally:
            self._sources.clear()

    def _shadow_once(self, name: str, runner: Runner, frame: _Frame, ref_leaves: Sequence[tuple[str, Tensor]],
                     copies: dict[int, Tensor]) -> dict[str, torch.dtype]:
        call = frame.call
        whole = runner.backend.compiles or not frame.children
        fn = out = None
        try:
            if not whole:
                mark = len(self.pending)
                try:
                    out, fn = self._own_code(name, runner, frame)
                    self.containers.add(call.key)
                except Exception:  # noqa: BLE001 - replay it whole instead
                    del self.pending[mark:]
                    log.debug("torchprobe: %s under %s does not replay with its children's answers; "
                              "running it whole:\n%s", call.key, name, traceback.format_exc())
                    out = None
            if out is None:
                a, k = self._private(name, frame.snapshot)
                fn = self._fn(name, runner, call.name, a, k)
                out = fn(*a, **k)
        except Exception as e:  # the user's module failing under a target is a finding
            failure = ShadowFailure(call, name, _describe(e), traceback.format_exc())
            self.shadow_failures.append(failure)
            self.pending.append(_Pending(call, call.key, name, ErrorKind.LOCAL, failure=failure.message))
            return {}
        test = dict(named_leaves(out))
        reuse = {}
        for path, r in ref_leaves:  # an output that is one of the replay's own copies, unchanged
            source = self._sources.get(id(test.get(path)))
            if source is not None and source[0] is test[path] and source[1] == _version(test[path]) \
                    and source[1] is not None and copies.get(id(r)) is source[2]:
                reuse[path] = (name, id(source[2]), test[path].dtype)
        self._compare(call, ref_leaves, test, name, ErrorKind.LOCAL, _events(fn), reuse=reuse)
        return {p: t.dtype for p, t in test.items()}

    def _own_code(self, name: str, runner: Runner, frame: _Frame) -> tuple[Any, Callable[..., Any]]:
        """Run a container's own code under the target, its kept children answered with the
        reference's outputs; compare what its code hands to each child. Returns (output, the
        callable that ran)."""
        fallback = runner.input_dtype
        device = self.devices[name]
        answers: dict[str, list[tuple[_Child, Any]]] = {}
        for child in frame.children:
            dtypes = child.dtypes.get(name, {})
            memo = {}
            for path, t in named_leaves(child.output):
                dtype = dtypes.get(path, fallback if t.is_floating_point() else None)
                memo[id(t)] = fresh = _fresh(t, dtype, device)
                self._sources[id(fresh)] = (fresh, _version(fresh), t)
            answers.setdefault(child.call.name, []).append((child, _copy_structure(child.output, memo)))
        a, k = self._private(name, frame.snapshot)
        fn = self._fn(name, runner, frame.call.name, a, k)
        # the container's inputs and its children's answers: passed on unchanged, they carry no error of its own
        exact = {id(t): _version(t) for _, t in _leaves(a, k)}
        exact.update((id(t), _version(t)) for calls in answers.values() for _, out in calls for _, t in named_leaves(out))
        patched: list[tuple[nn.Module, Any]] = []
        substitutes = []
        try:
            for child_name, calls in answers.items():
                module = self._module(name, runner, child_name)
                if child_name == frame.call.name or "forward" in vars(module) and isinstance(vars(module)["forward"], _Answer):
                    raise _Mismatch(f"{child_name} calls itself")
                answer = _Answer(self, name, frame.call, calls, exact)
                patched.append((module, vars(module).get("forward", _MISSING)))
                module.forward = answer  # on the target's private copy, undone below
                substitutes.append(answer)
            out = fn(*a, **k)
        finally:
            for module, previous in reversed(patched):
                if previous is _MISSING:
                    del module.forward
                else:
                    module.forward = previous
        left = [s.calls[s.next][0].call.key for s in substitutes if s.next < len(s.calls)]
        if left:
            raise _Mismatch(f"not called under the target: {', '.join(left[:3])}")
        return out, fn

    def _fn(self, name: str, runner: Runner, module_name: str, args: tuple, kwargs: dict) -> Callable[..., Any]:
        """The target's callable for one module of its copy, made once (``args``/``kwargs``: an
        example call in the target's input dtype, what compiling backends compile for)."""
        fn = self._fns.get((name, module_name))
        if fn is None:
            module = runner.module if module_name == ROOT else self._module(name, runner, module_name)
            fn = self._fns[(name, module_name)] = runner.backend.wrap(module, runner.target.dtype, args, kwargs)
        return fn

    def _private(self, name: str, snapshot: tuple[tuple, dict]) -> tuple[tuple, dict]:
        """One replay's own copy of a snapshot (its tensors remembered as copies of the reference's)."""
        dtype, device = self.runners[name].input_dtype, self.devices[name]
        memo = {}
        for _, t in _leaves(*snapshot):
            memo[id(t)] = fresh = _fresh(t, dtype, device)
            self._sources[id(fresh)] = (fresh, _version(fresh), t)
        return _copy_structure(snapshot, memo)

    def _module(self, name: str, runner: Runner, module_name: str) -> nn.Module:
        module = self._modules.get((name, module_name))
        if module is None:
            module = self._modules[(name, module_name)] = submodule(runner.module, module_name)
        return module

    def _compare(self, call: Call, ref_leaves: Sequence[tuple[str, Tensor]], test: dict[str, Tensor],
                 target: str, kind: ErrorKind, events: list[Any] | None = None, key_prefix: str | None = None,
                 guard: tuple[str, torch.dtype] | None = None, reuse: dict[str, tuple] | None = None,
                 seen: dict[tuple, tuple] | None = None) -> None:
        """Queue the error of every floating leaf. ``reuse``: per leaf, a key under which the same
        (reference copy, rounded copy) pair was measured before; ``seen``: pairs already measured
        in this pass, by the identity of both tensors (the same objects, unchanged)."""
        for path, r in ref_leaves:
            if not r.is_floating_point():
                continue
            key = leaf_key(call.key if key_prefix is None else key_prefix, path)
            t = test.get(path)
            if t is None or t.shape != r.shape:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                self.pending.append(_Pending(call, key, target, kind,
                                             failure=f"output {path or 'tensor'}: expected shape {tuple(r.shape)}, got {got}"))
                continue
            cache, cache_key, anchors = None, None, ()
            if reuse and path in reuse:
                cache, cache_key, anchors = self._rounding, reuse[path], (self._sources[id(t)][2],)
            elif seen is not None and _version(t) is not None:
                cache, cache_key, anchors = seen, (id(t), _version(t), id(r)), (t, r)
            hit = cache.get(cache_key) if cache is not None else None
            if hit is not None and all(ref() is a for ref, a in zip(hit[0], anchors)):
                vector, stats = hit[1], hit[2]
            else:
                vector = error_vector(r, t)
                stats = (t.dtype, tuple(t.shape), self.recording.summarize(t))
                if cache is not None:
                    cache[cache_key] = (tuple(weakref.ref(a) for a in anchors), vector, stats)
            self.pending.append(_Pending(call, key, target, kind, vector, stats, events=list(events or []), guard=guard))

    # -- subtree pass -----------------------------------------------------------------------
    def subtree_pass(self, names: Sequence[str]) -> None:
        """Run the reference again; every container call measured by its own code in the
        reference pass now runs whole under each target in ``names`` on its exact inputs."""
        names = [n for n in names if n in self.runners and not self.runners[n].backend.compiles]
        redo = {(n, key) for n in names for key in self.containers}
        if not redo:
            return
        self.pending = [p for p in self.pending if (p.target, p.call.key) not in redo or p.kind != ErrorKind.LOCAL]
        ref = self.ref_runner or self._reference_runner()
        containers = self.containers
        shadows: dict[str, list[tuple[str, Any]]] = {}

        def before(call: Call, module: nn.Module, args: tuple, kwargs: dict) -> None:
            if call.key not in containers:
                return
            memo = {id(t): t.detach().clone() for _, t in _leaves(args, kwargs)}
            frame = _Frame(call, _copy_structure((args, kwargs), memo), {})
            shadows[call.key] = []
            for name in names:
                runner = self.runners[name]
                try:
                    a, k = self._private(name, frame.snapshot)
                    fn = self._fn(name, runner, call.name, a, k)
                    shadows[call.key].append((name, (fn(*a, **k), _events(fn))))
                except Exception as e:  # noqa: BLE001 - a finding, like any shadow failure
                    shadows[call.key].append((name, ShadowFailure(call, name, _describe(e), traceback.format_exc())))
                finally:
                    self._sources.clear()

        def after(call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            leaves = named_leaves(output)
            for name, shadow in shadows.pop(call.key, ()):
                if isinstance(shadow, ShadowFailure):
                    self.shadow_failures.append(shadow)
                    self.pending.append(_Pending(call, call.key, name, ErrorKind.LOCAL, failure=shadow.message))
                    continue
                out, events = shadow
                self._compare(call, leaves, dict(named_leaves(out)), name, ErrorKind.LOCAL, events)

        a, k = replay_copy((self.args, self.kwargs))
        with module_calls(ref.module, self.keep, before=before, after=after):
            ref(*a, **k)

    # -- propagated passes ------------------------------------------------------------------
    def propagated_pass(self, name: str, runner: Runner, reference: dict[str, Tensor]) -> bool:
        """Run the whole model under the target; False when it failed (recorded as a finding)."""
        per_module = not runner.backend.compiles
        keep = self.keep if per_module else (lambda n: n == ROOT)
        open_calls: list[Call] = []
        seen: dict[tuple, tuple] = {}

        def before(call: Call, module: nn.Module, args: tuple, kwargs: dict) -> None:
            open_calls.append(call)

        def after(call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            open_calls.pop()
            self._compare_to_reference(call, output, reference, name, seen)

        a, k = replay_copy((self.args, self.kwargs))
        try:
            if per_module:
                with module_calls(runner.module, keep, before=before, after=after):
                    runner(*a, **k)
            else:
                out = runner(*a, **k)
                self._compare_to_reference(Call(ROOT, 0, type(runner.module).__name__), out, reference, name)
        except Exception as e:  # the user's model failing under a target is a finding
            where = f" (in {open_calls[-1].key})" if open_calls else ""
            log.info("the model failed under %s%s:\n%s", name, where, traceback.format_exc())
            self.failures[name] = f"the model failed under {name}{where}: {_describe(e)}"
            return False
        return True

    def _compare_to_reference(self, call: Call, output: Any, reference: dict[str, Tensor], name: str,
                              seen: dict[tuple, tuple] | None = None) -> None:
        leaves = named_leaves(output)
        ref_leaves = []
        key = call.key
        for p, t in leaves:
            r = reference.get(leaf_key(key, p))
            if r is not None:
                ref_leaves.append((p, r if r.device == t.device else r.to(t.device, non_blocking=True)))
        self._compare(call, ref_leaves, dict(leaves), name, ErrorKind.PROPAGATED, seen=seen)

    # -- the one host read ------------------------------------------------------------------
    def read(self) -> tuple[list[ModuleError], list[InputStats]]:
        """One host read for every pending vector; build the typed results."""
        vectors = {id(p.vector): p.vector for p in self.pending if p.vector is not None}  # reused ones once
        summaries = {id(p.stats): p.stats for p in self.pending if p.stats is not None}
        metrics_of = dict(zip(vectors, map(from_vector, _stats.to_host(list(vectors.values())))))
        stats_of = dict(zip(summaries, _stats.read(list(summaries.values()))))
        input_stats = _stats.read([(d, s, v) for _, d, s, v in self.inputs])
        inputs = [InputStats(key, s) for (key, _, _, _), s in zip(self.inputs, input_stats)]
        by_key = {i.key: i.stats for i in inputs}
        errors = []
        for p in self.pending:
            metrics = None if p.vector is None else metrics_of[id(p.vector)]
            stats = None if p.stats is None else stats_of[id(p.stats)]
            if p.guard is not None and not _representable(by_key.get(p.guard[0]), p.guard[1]):
                continue
            events = tuple(BackendEvent(ev.op, ev.what, ev.count, ev.input_absmax, str(ev.dtype).replace("torch.", ""),
                                        text=str(ev)) for recorded in p.events for ev in recorded.events())
            errors.append(ModuleError(p.key, p.call.name, p.call.index, p.target, p.kind, metrics, stats, p.failure, events))
        return errors, inputs


class _Answer:
    """Stands in for a child's ``forward`` in a container's shadow: compares the values the
    container's code hands to the child with the reference's, then returns the reference's
    output of that call (already in the dtype the child returns under the target)."""

    def __init__(self, session: Session, target: str, parent: Call, calls: list[tuple[_Child, Any]], exact: dict[int, int]):
        self.session, self.target, self.parent = session, target, parent
        self.calls, self.exact, self.next = calls, exact, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.next >= len(self.calls):
            raise _Mismatch(f"{self.calls[0][0].call.name} called more often than in the reference run")
        child, answer = self.calls[self.next]
        self.next += 1
        session = self.session
        dtype = session.runners[self.target].target.dtype
        prefix = f"{self.parent.key}:->{child.call.key}"
        for path, t in _leaves(args, kwargs):
            ref = child.inputs.get(path)
            if ref is None or not t.is_floating_point() or _version(t) is not None and self.exact.get(id(t)) == _version(t):
                continue  # no reference to compare with, or passed on unchanged
            session._compare(self.parent, [(path, ref)], {path: t}, self.target, ErrorKind.LOCAL,
                             key_prefix=prefix, guard=(leaf_key(child.call.key, path), dtype))
        return answer


_MISSING = object()


def _version(t: Tensor) -> int | None:
    """The in-place version counter (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


def _leaves(args: tuple, kwargs: dict) -> list[tuple[str, Tensor]]:
    """``named_leaves((args, kwargs))``, walking only the arguments that are not a tensor or a scalar."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            out.append((f"0.{i}", a))
        elif not isinstance(a, _PLAIN):
            out.extend(named_leaves(a, f"0.{i}"))
    for key, v in kwargs.items():
        if isinstance(v, Tensor):
            out.append((f"1.{key}", v))
        elif not isinstance(v, _PLAIN):
            out.extend(named_leaves(v, f"1.{key}"))
    return out


def _copy_structure(obj: Any, memo: dict[int, Tensor]) -> Any:
    """A copy of ``obj`` whose tensor leaves are ``memo[id(leaf)]`` and whose mutable non-tensor
    objects (dicts, lists, a Cache) are deep copies, so no later change of ``obj`` reaches it."""
    if isinstance(obj, Tensor):
        return memo.get(id(obj), obj)
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], tuple) and isinstance(obj[1], dict) \
            and all(isinstance(a, (Tensor, *_PLAIN)) for a in obj[0]) \
            and all(isinstance(v, (Tensor, *_PLAIN)) for v in obj[1].values()):
        return (tuple(memo.get(id(a), a) if isinstance(a, Tensor) else a for a in obj[0]),
                {k: memo.get(id(v), v) if isinstance(v, Tensor) else v for k, v in obj[1].items()})
    try:
        return copy.deepcopy(obj, dict(memo))
    except Exception:  # noqa: BLE001 - an object that refuses deepcopy: replace its tensors only
        return map_tensors(obj, lambda t: memo.get(id(t), t))


def _fresh(t: Tensor, dtype: torch.dtype | None, device: torch.device) -> Tensor:
    """A new tensor holding ``t`` on ``device``, floating values in ``dtype`` (None: as they are)."""
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(device=device, dtype=dtype)
    return t.to(device=device, copy=True)


def _representable(stats: Any, dtype: torch.dtype) -> bool:
    if stats is None or not stats.is_floating:
        return True
    if stats.nonfinite:
        return False
    return not stats.absmax > torch.finfo(dtype).max


def _events(fn: Callable[..., Any]) -> list[Any]:
    """What a backend recorded during the last run of ``fn`` (strict: its overflow events,
    still on the device; read with the rest in :meth:`Session.read`)."""
    events = getattr(fn, "events", None)
    return [events] if events is not None else []


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
