"""Precision plans: which modules stay in FP32 while the rest runs in the target dtype.

Applying a plan always works on a copy. Kept modules are cast to FP32 inside the graph itself:
their floating inputs are cast to FP32, their outputs back to the target dtype, and under autocast
they run in an ``autocast(enabled=False)`` region. One plan therefore serves every backend,
including strongly typed TensorRT, where graph dtypes are the only precision lever left.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InvalidArgument
from ..names import ROOT, is_within, module_names, submodule
from ..tree import cast_floating
from .base import dtype_name


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
        return sorted(n for n in self.keep_fp32 if not any(o != n and is_within(n, o) for o in self.keep_fp32))

    def check(self, model: nn.Module) -> None:
        """Raise InvalidArgument naming any kept module that ``model`` does not have."""
        known = {alias for n in module_names(model).values() for alias in (n.name, *n.aliases)}
        for name in sorted(self.keep_fp32):
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise InvalidArgument(f"keep_fp32 names module {name!r}, which the model does not have{hint}")

    def apply(self, model: nn.Module, *, cast_weights: bool = True, autocast_device: str | None = None) -> nn.Module:
        """A copy of ``model`` running this plan; ``model`` itself is untouched.

        ``cast_weights=True`` casts the copy to ``dtype`` (eager, strict, inductor, tensorrt);
        ``False`` keeps FP32 weights for autocast, where kept modules get autocast-disabled regions
        on ``autocast_device``.
        """
        self.check(model)
        clone = copy.deepcopy(model)
        if cast_weights:
            clone.to(self.dtype)
        for name in self.outermost():
            module = submodule(clone, name)
            module.float()
            out_dtype = self.dtype if cast_weights and name != ROOT else None
            module.forward = _fp32_forward(module.forward, out_dtype, None if cast_weights else autocast_device)
        return clone


def _fp32_forward(inner: Callable[..., Any], out_dtype: torch.dtype | None, autocast_device: str | None) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = cast_floating((args, kwargs), torch.float32)
        region = torch.autocast(autocast_device, enabled=False) if autocast_device else contextlib.nullcontext()
        with region:
            out = inner(*args, **kwargs)
        return out if out_dtype is None else cast_floating(out, out_dtype)

    return forward
