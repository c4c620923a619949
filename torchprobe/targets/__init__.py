"""Targets: ``"<backend>:<dtype>"`` strings parsed once, and runners that execute them.

One backend per file behind :class:`~torchprobe.targets.base.Backend`; optional heavy backends
(``tensorrt``) are imported only when used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import InvalidArgument, UnsupportedTarget
from ..names import ROOT, submodule
from ..tree import cast_floating, map_tensors
from .base import DTYPES, LOW_PRECISION, Backend, Target, check_dtype, dtype_name, model_device
from .plan import PrecisionPlan

_BACKENDS = {
    "eager": ("eager", "EagerBackend"),
    "autocast": ("autocast", "AutocastBackend"),
    "strict": ("strict", "StrictBackend"),
    "strict-onnx": ("strict_onnx", "StrictOnnxBackend"),
    "inductor": ("inductor", "InductorBackend"),
    "tensorrt": ("tensorrt", "TensorRTBackend"),
}
BACKEND_NAMES = tuple(_BACKENDS)

__all__ = ["Target", "PrecisionPlan", "Runner", "parse_target", "get_backend", "build", "BACKEND_NAMES", "dtype_name"]


def parse_target(spec: str | Target) -> Target:
    """``"strict:fp16"`` -> Target; ``"fp32"``/``"fp64"`` alone is the eager reference."""
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str):
        raise InvalidArgument(f"target must be a string like 'strict:fp16'; got {type(spec).__name__}")
    text = spec.strip().lower()
    backend, _, dtype = text.rpartition(":")
    backend = backend or "eager"
    if backend not in _BACKENDS or dtype not in DTYPES:
        valid = ", ".join(f"{b}:{d}" for b in _BACKENDS for d in ("fp16", "bf16")) + ", fp32, fp64"
        raise InvalidArgument(f"target {spec!r} is not known; valid targets: {valid}")
    target = Target(backend, DTYPES[dtype])
    check_dtype(get_backend(backend), target.dtype, spec)
    return target


def get_backend(name: str) -> Backend:
    module_name, class_name = _BACKENDS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)()


@dataclass
class Runner:
    """A private copy of a model prepared for one target and precision plan.

    Call it with the FP32 inputs; floating inputs are cast to the target dtype where the backend
    needs it and low-precision outputs come back as FP32.
    """

    target: Target
    plan: PrecisionPlan
    backend: Backend
    module: nn.Module
    input_dtype: torch.dtype | None
    example: tuple[tuple, dict]
    _fn: Callable[..., Any] | None = None

    @property
    def fn(self) -> Callable[..., Any]:
        """The whole copy under the backend, built (compiled) on first use."""
        if self._fn is None:
            self._fn = self.backend.wrap(self.module, self.target.dtype, *self.example)
        return self._fn

    def cast_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.input_dtype is None:
            return args, kwargs
        return cast_floating((args, kwargs), self.input_dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self.cast_inputs(args, kwargs)
        with torch.no_grad():
            out = self.fn(*args, **kwargs)
        return _upcast(out)

    def part(self, name: str, args: tuple, kwargs: dict) -> Callable[..., Any]:
        """A callable running submodule ``name`` of this copy alone under the target; it takes
        the reference's (FP32) inputs and returns FP32 outputs."""
        module = self.module if name == ROOT else submodule(self.module, name)
        cargs, ckwargs = self.cast_inputs(args, kwargs)
        fn = self.backend.wrap(module, self.target.dtype, cargs, ckwargs)

        def run(*a: Any, **k: Any) -> Any:
            a, k = self.cast_inputs(a, k)
            with torch.no_grad():
                return _upcast(fn(*a, **k))

        run.backend_fn = fn  # type: ignore[attr-defined]
        return run


def _upcast(out: Any) -> Any:
    """FP16/BF16 outputs as FP32; FP32/FP64 and integer outputs untouched."""
    return map_tensors(out, lambda t: t.float() if t.dtype in LOW_PRECISION else t)


def _dtype_unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} does not support bfloat16; use fp16"
    return None


def build(target: str | Target, model: nn.Module, args: tuple, kwargs: dict, keep_fp32: Iterable[str] = ()) -> Runner:
    """Prepare a copy of ``model`` for ``target`` with ``keep_fp32`` modules kept in FP32."""
    target = parse_target(target)
    backend = get_backend(target.backend)
    device = model_device(model, args, kwargs)
    reason = backend.unavailable(device) or _dtype_unavailable(target.dtype, device)
    if reason:
        raise UnsupportedTarget(f"target {target} cannot run here: {reason}")
    plan = PrecisionPlan(target.dtype, frozenset(keep_fp32))
    copy = plan.apply(model, cast_weights=backend.cast_weights, autocast_device=device.type).eval()
    input_dtype = target.dtype if backend.cast_weights else None
    example = cast_floating((args, kwargs), input_dtype) if input_dtype else (args, kwargs)
    return Runner(target, plan, backend, copy, input_dtype, example)
