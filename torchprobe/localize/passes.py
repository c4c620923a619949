"""The passes of one report(): the reference pass with shadow runs, then one propagated pass per target.

All runs use private copies of the model (the user's module is never run or changed), and every
replay (shadow, propagated) runs on its own copy of the inputs, mutable non-tensor objects (a
transformers Cache, dicts) included, so a target's figures do not depend on which other targets
ran, or in which order.

1. **Reference pass** (eager FP32, or FP64): per-module input and output statistics and a copy of
   every output (on the device, or in host memory with ``offload=True``). Inside it, before each
   module runs, a **shadow** run executes the same module of each target's copy on the
   reference's exact inputs: the error it shows is the error that module *introduces*.
2. **Propagated pass** per target: the whole model under the target; each module's output is
   compared with the reference copy from step 1. Compiling backends (inductor, tensorrt) are run
   whole and only their final output is compared; their per-module view is the local error.
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import stats as _stats
from ..capture import Call, Recording, module_calls, recording
from ..errors import UnsupportedTarget
from ..kinds import ErrorKind
from ..metrics import error_vector, from_vector
from ..names import ROOT
from ..results import BackendEvent, InputStats, ModuleError
from ..targets import Runner, Target, build
from ..tree import leaf_key, named_leaves, replay_copy

log = logging.getLogger(__name__)


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


@dataclass
class ShadowFailure:
    """A module that raised when run alone under a target, with its full traceback."""

    call: Call
    target: str
    message: str
    traceback: str


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
        self._parts: dict[tuple[str, str], Callable[..., Any]] = {}
        self._shadow: dict[tuple[str, str], Any] = {}
        self.recording: Recording | None = None

    # -- building ---------------------------------------------------------------------------
    def prepare(self) -> None:
        self.ref_runner = build(self.reference, self.model, self.args, self.kwargs)
        for target in self.targets:
            try:
                self.runners[str(target)] = build(target, self.model, self.args, self.kwargs)
            except UnsupportedTarget as e:
                self.failures[str(target)] = str(e)

    # -- reference pass ---------------------------------------------------------------------
    def reference_pass(self) -> Recording:
        ref = self.ref_runner
        with recording(ref.module, self.keep, capture=True, offload=self.offload,
                       before=self._before, after=self._after) as rec:
            self.recording = rec
            a, k = replay_copy((self.args, self.kwargs))
            self.root_output = ref(*a, **k)
        return rec

    def _before(self, call: Call, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for path, t in named_leaves((args, kwargs)):
            vector = self.recording.summary(t, copy=False)[0]
            self.inputs.append((leaf_key(call.key, path), t.dtype, tuple(t.shape), vector))
        if not self.local or call.name == ROOT:
            return
        for name, runner in self.runners.items():
            try:
                part = self._parts.get((name, call.name))
                if part is None:
                    part = self._parts[(name, call.name)] = runner.part(call.name, args, kwargs)
                a, k = replay_copy((args, kwargs))
                self._shadow[(name, call.key)] = (part(*a, **k), _events(part))
            except Exception as e:  # the user's module failing under a target is a finding
                self._shadow[(name, call.key)] = ShadowFailure(call, name, _describe(e), traceback.format_exc())

    def _after(self, call: Call, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        leaves = named_leaves(output)
        for name in self.runners:
            shadow = self._shadow.pop((name, call.key), None)
            if shadow is None:
                continue
            if isinstance(shadow, ShadowFailure):
                self.shadow_failures.append(shadow)
                self.pending.append(_Pending(call, call.key, name, ErrorKind.LOCAL, failure=shadow.message))
                continue
            out, events = shadow
            self._compare(call, leaves, dict(named_leaves(out)), name, ErrorKind.LOCAL, events)

    def _compare(self, call: Call, ref_leaves: Sequence[tuple[str, Tensor]], test: dict[str, Tensor],
                 target: str, kind: ErrorKind, events: list[Any] | None = None) -> None:
        for path, r in ref_leaves:
            if not r.is_floating_point():
                continue
            key = leaf_key(call.key, path)
            t = test.get(path)
            if t is None or t.shape != r.shape:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                self.pending.append(_Pending(call, key, target, kind,
                                             failure=f"output {path or 'tensor'}: expected shape {tuple(r.shape)}, got {got}"))
                continue
            vector = error_vector(r, t)
            stats = (t.dtype, tuple(t.shape), self.recording.summarize(t))
            self.pending.append(_Pending(call, key, target, kind, vector, stats, events=list(events or [])))

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
            self._compare_to_reference(call, output, reference, name)

        a, k = replay_copy((self.args, self.kwargs))
        try:
            if per_module:
                with module_calls(runner.module, keep, before=before, after=after):
                    runner(*a, **k)
            else:
                out = runner(*a, **k)
                self._compare_to_reference(Call(ROOT, 0, type(runner.module).__name__), out, reference, name)
        except Exception as e:  # the user's model failing under a target is a finding
            where = f" (in {open_calls[-1]})" if open_calls else ""
            log.info("the model failed under %s%s:\n%s", name, where, traceback.format_exc())
            self.failures[name] = f"the model failed under {name}{where}: {_describe(e)}"
            return False
        return True

    def _compare_to_reference(self, call: Call, output: Any, reference: dict[str, Tensor], name: str) -> None:
        leaves = named_leaves(output)
        ref_leaves = [(p, reference[leaf_key(call.key, p)].to(t.device, non_blocking=True))
                      for p, t in leaves if leaf_key(call.key, p) in reference]
        self._compare(call, ref_leaves, dict(leaves), name, ErrorKind.PROPAGATED)

    # -- the one host read ------------------------------------------------------------------
    def read(self) -> tuple[list[ModuleError], list[InputStats]]:
        """One host read for every pending vector; build the typed results."""
        host = _stats.to_host([p.vector for p in self.pending if p.vector is not None])
        read_stats = _stats.read([p.stats for p in self.pending if p.stats is not None])
        input_stats = _stats.read([(d, s, v) for _, d, s, v in self.inputs])
        errors, vi, si = [], 0, 0
        for p in self.pending:
            metrics = stats = None
            if p.vector is not None:
                metrics = from_vector(host[vi])
                vi += 1
            if p.stats is not None:
                stats = read_stats[si]
                si += 1
            events = tuple(BackendEvent(ev.op, ev.what, ev.count, ev.input_absmax, str(ev.dtype).replace("torch.", ""),
                                        text=str(ev)) for recorded in p.events for ev in recorded.events())
            errors.append(ModuleError(p.key, p.call.name, p.call.index, p.target, p.kind, metrics, stats, p.failure, events))
        inputs = [InputStats(key, s) for (key, _, _, _), s in zip(self.inputs, input_stats)]
        return errors, inputs


def _events(part: Callable[..., Any]) -> list[Any]:
    """What a backend recorded during the last run of ``part`` (strict: its overflow events,
    still on the device; read with the rest in :meth:`Session.read`)."""
    events = getattr(getattr(part, "backend_fn", None), "events", None)
    return [events] if events is not None else []


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
