"""Precision plans: which modules stay in FP32 while the rest runs in the target dtype.

A kept module computes in FP32 inside the graph itself: its weights are FP32, a forward pre-hook
casts its floating inputs to FP32 (and, under autocast, opens an ``autocast(enabled=False)``
region), and a forward hook casts its outputs back to the target dtype (and closes the region,
also when the forward raises). One plan therefore serves every backend, including strongly typed
TensorRT, where graph dtypes are the only precision lever left.

The hooks are instances of a module-level class, not closures swapped into ``forward``, so a kept
model is a normal model: ``copy.deepcopy``, ``torch.save``/``torch.load(weights_only=False)``
(torchprobe must be importable where it loads), ``state_dict`` round trips and
``torch.export.export(..., strict=False)`` keep the plan, and module names do not change (no
wrapper module). Every module inside a kept one carries the same hooks without the cast back, so
it also computes in FP32 when it is called on its own (torchprobe's per-module replays).

A model that already keeps modules in FP32 (``fix.apply(model)``, :func:`keep_fp32`) keeps them in
every copy :meth:`PrecisionPlan.apply` makes: the copy is cast, then its kept modules are put back
to FP32 with hooks aimed at the new dtype. So torchprobe measures a fixed model as it runs.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import InvalidArgument, TorchprobeError
from ..names import ROOT, module_names, outermost
from ..tree import cast_floating
from .base import dtype_name

__all__ = ["PrecisionPlan", "KeepFP32", "keep_fp32", "kept_fp32", "remove_keep_fp32"]


@dataclass(frozen=True)
class PrecisionPlan:
    """``dtype`` for the whole model, except the modules named in ``keep_fp32``."""

    dtype: torch.dtype
    keep_fp32: frozenset[str] = field(default_factory=frozenset)

    def __str__(self) -> str:
        kept = ", ".join(sorted(self.keep_fp32)) or "nothing"
        return f"{dtype_name(self.dtype)}, FP32 kept: {kept}"

    def outermost(self) -> list[str]:
        """Kept names not inside another kept name (inside a kept module everything is FP32)."""
        return outermost(self.keep_fp32)

    def check(self, model: nn.Module) -> None:
        """Raise InvalidArgument naming any kept module that ``model`` does not have."""
        _check_names(model, self.keep_fp32, "keep_fp32")

    def apply(self, model: nn.Module, *, cast_weights: bool = True, autocast_device: str | None = None) -> nn.Module:
        """A copy of ``model`` running this plan; ``model`` itself is untouched.

        ``cast_weights=True`` casts the copy to ``dtype`` (eager, strict, inductor, tensorrt): kept
        modules take FP32 inputs and return ``dtype`` outputs (the root returns FP32).
        ``False`` keeps the weights as they are for autocast, where kept modules run in
        autocast-disabled regions on ``autocast_device`` and return FP32. Modules ``model``
        already keeps in FP32 stay kept in the copy, retargeted to this plan.

        >>> fixed = PrecisionPlan(torch.float16, frozenset({"1"})).apply(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
        >>> fixed[0].weight.dtype, fixed[1].weight.dtype, fixed(torch.randn(2, 4).half()).dtype
        (torch.float16, torch.float32, torch.float16)
        """
        self.check(model)
        clone = drop_observer_hooks(copy.deepcopy(model))
        names = set(self.keep_fp32) | set(kept_fp32(clone))
        if cast_weights:
            return keep_fp32(clone, names, dtype=self.dtype)
        return keep_fp32(clone, names, autocast_device=autocast_device)


class KeepFP32:
    """The hooks of one module computing in FP32.

    ``enter`` (a forward pre-hook) casts the floating inputs to FP32 and, with
    ``autocast_device``, opens an ``autocast(enabled=False)`` region; ``exit`` (a forward hook
    with ``always_call=True``) closes the region, also when the forward raised, and casts floating
    outputs to ``cast_to`` (None: leave them FP32). ``region_root`` is True for the kept module
    itself, False for the modules inside it. Instances pickle and deep-copy with their module.
    """

    def __init__(self, name: str, cast_to: torch.dtype | None, autocast_device: str | None, region_root: bool) -> None:
        self.name = name
        self.cast_to = cast_to
        self.autocast_device = autocast_device
        self.region_root = region_root
        self._open: list[Any] = []  # autocast regions entered by calls still running

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = []  # a region belongs to the running call, not to a copy
        return state

    def __repr__(self) -> str:
        to = dtype_name(self.cast_to) if self.cast_to is not None else "fp32"
        region = f", autocast off on {self.autocast_device}" if self.autocast_device else ""
        return f"KeepFP32({self.name!r}, outputs {to}{region})"

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for pname, p in module._parameters.items():  # direct ones: modules inside check their own
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                raise TorchprobeError(
                    f"module {self.name!r} is kept in FP32 but its parameter {pname!r} is {dtype_name(p.dtype)}: "
                    "the model was cast after keep_fp32(), which rounds the kept weights too; cast with "
                    "torchprobe.targets.plan.keep_fp32(model, names, dtype) instead (it keeps their FP32 values), "
                    "or call keep_fp32(model, kept_fp32(model), dtype) again to compute them in FP32")
        args, kwargs = cast_floating((args, kwargs), torch.float32)
        if self.autocast_device is not None:
            region = torch.autocast(self.autocast_device, enabled=False)
            region.__enter__()
            self._open.append(region)
        return args, kwargs

    def exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.autocast_device is not None and self._open:
            self._open.pop().__exit__(None, None, None)
        if self.cast_to is None or output is None:
            return None
        return cast_floating(output, self.cast_to)


def keep_fp32(model: nn.Module, names: Iterable[str], dtype: torch.dtype | None = None,
              autocast_device: str | torch.device | None = None) -> nn.Module:
    """Run ``model`` in ``dtype`` with the named submodules in FP32, in place; returns ``model``.

    With ``dtype`` (e.g. ``torch.float16``) the rest of the model is cast to it and the kept
    modules keep their own values in FP32 (not rounded through ``dtype``); floating inputs of a
    kept module are cast to FP32 and its floating outputs back to ``dtype`` (the root's stay
    FP32). ``dtype=None`` casts nothing but the kept modules (to FP32) and leaves their outputs
    FP32: the autocast case, where ``autocast_device`` (``"cuda"``, ``"cpu"``) also runs them with
    autocast disabled. Names inside another kept name collapse to the outermost; modules
    ``model`` already keeps stay kept, retargeted to ``dtype``/``autocast_device``. A later
    ``.half()`` of the whole model undoes the FP32 weights: the kept module's forward then
    raises, naming it. Undo with :func:`remove_keep_fp32`.

    >>> import torch
    >>> from torchprobe.models.detector import build_detector
    >>> from torchprobe.targets.plan import keep_fp32, kept_fp32
    >>> model, images = build_detector()
    >>> model = keep_fp32(model, ["encoder.layers.1.norm2"], dtype=torch.float16)
    >>> model(images.half())["boxes"].dtype, model.encoder.layers[1].norm2.weight.dtype
    (torch.float16, torch.float32)
    >>> kept_fp32(model)
    ['encoder.layers.1.norm2']
    >>> torch.save(model, "fixed.pt")   # picklable; torch.load("fixed.pt", weights_only=False)

    For autocast: ``keep_fp32(model, names, autocast_device="cuda")``, then run the model under
    ``torch.autocast("cuda", dtype=torch.float16)``.
    """
    if isinstance(names, str):
        raise InvalidArgument(f"names= takes a list of module names such as ['encoder.norm']; got the string {names!r}")
    names = [ROOT if n == "" else n for n in names]
    _check_names(model, names, "names")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InvalidArgument(f"dtype= must be a floating torch.dtype such as torch.float16, or None; got {dtype!r}")
    if isinstance(autocast_device, torch.device):
        autocast_device = autocast_device.type
    if autocast_device is not None and not isinstance(autocast_device, str):
        raise InvalidArgument(f"autocast_device= must be a device type such as 'cuda' or 'cpu', or None; got {autocast_device!r}")
    canonical = module_names(model)
    by_name = dict(model.named_modules(remove_duplicate=False))
    by_name[ROOT] = model
    kept = {canonical[by_name[n]].name for n in (*names, *kept_fp32(model))}
    remove_keep_fp32(model)
    roots = [(name, by_name[name]) for name in outermost(kept)]
    # state_dict() holds the kept tensors as they are: .to() gives the parameters new tensors and
    # leaves the old ones alone, so the kept modules get their own values back, not a round trip
    # through dtype.
    held = [(root, root.state_dict()) for _, root in roots]
    if dtype is not None:
        model.to(dtype)
    for root, state in held:
        root.float()
        root.load_state_dict(state)
    inside: set[int] = set()
    for name, root in roots:
        _install(root, KeepFP32(name, None if name == ROOT else dtype, autocast_device, region_root=True))
        inside.add(id(root))
        for sub_name, sub in root.named_modules(prefix="" if name == ROOT else name):
            if id(sub) not in inside:
                inside.add(id(sub))
                _install(sub, KeepFP32(sub_name, None, autocast_device, region_root=False))
    return model


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_KWARG_SETS = ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


#: Packages whose hooks are part of what a model computes (tensor parallel input/output
#: conversion, FSDP2 parameter gathering, legacy weight_norm/spectral_norm, adapters): kept on copies.
COMPUTING_HOOK_PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "peft", "timm")
#: torchprobe's own computing hooks: keep-FP32 casts, FSDP2 shard gathering of distributed.copyable().
_COMPUTING_TORCHPROBE = ("torchprobe.targets.plan", "torchprobe.distributed")


def _defined_in(hook: Any) -> str:
    fn = getattr(hook, "func", hook)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # bound method
    return getattr(fn, "__module__", None) or type(fn).__module__ or ""


def _computes(hook: Any) -> bool:
    """Hooks that are part of what the module computes, not observers: keep-FP32 hooks, and hooks
    of the libraries in :data:`COMPUTING_HOOK_PACKAGES`."""
    where = _defined_in(hook)
    return where in _COMPUTING_TORCHPROBE or where.split(".")[0] in COMPUTING_HOOK_PACKAGES


def drop_observer_hooks(copied: nn.Module) -> nn.Module:
    """Remove, in place, the observer hooks a deep copy inherited from the caller's model (a
    logger of the user's code, a Monitor): they must not fire on torchprobe's replays. Hooks that
    are part of the computation (DTensor tensor parallel, FSDP2, ``weight_norm``, keep-FP32; see
    :func:`_computes`) stay, so the copy computes what the model computes."""
    for module in copied.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if not hooks:
                continue
            for key in [k for k, h in hooks.items() if not _computes(h)]:
                del hooks[key]
                for extra in _KWARG_SETS:
                    getattr(module, extra, {}).pop(key, None)
    return copied


def kept_fp32(model: nn.Module) -> list[str]:
    """Names of the modules ``model`` keeps in FP32 (the outermost ones), in module order."""
    out = []
    for module, name in module_names(model).items():
        if any(h.region_root for h in _hooks_of(module)):
            out.append(name.name)
    return out


def remove_keep_fp32(model: nn.Module) -> nn.Module:
    """Remove every keep-FP32 hook from ``model``, in place (weights keep their dtypes)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook_id in [i for i, h in hooks.items() if isinstance(getattr(h, "__self__", None), KeepFP32)]:
                del hooks[hook_id]
                for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                              module._forward_hooks_always_called):
                    extra.pop(hook_id, None)
    return model


def _install(module: nn.Module, hooks: KeepFP32) -> None:
    # Pre-hook appended: hooks registered before see the caller's inputs. Forward hook prepended:
    # every module forward hook sees the outputs as cast back (process-wide hooks run first).
    module.register_forward_pre_hook(hooks.enter, with_kwargs=True)
    module.register_forward_hook(hooks.exit, with_kwargs=True, always_call=True, prepend=True)


def _hooks_of(module: nn.Module) -> list[KeepFP32]:
    return [h.__self__ for h in module._forward_pre_hooks.values() if isinstance(getattr(h, "__self__", None), KeepFP32)]


def _check_names(model: nn.Module, names: Iterable[str], argument: str) -> None:
    names = list(names)
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgument(f"{argument} takes module names (strings) such as 'encoder.norm'; got {name!r}")
    known = {alias for n in module_names(model).values() for alias in (n.name, *n.aliases)}
    for name in sorted(names):
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InvalidArgument(f"{argument} names module {name!r}, which the model does not have{hint}")
