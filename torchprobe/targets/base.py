"""The one interface every backend implements, and the parsed form of a target string."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import InvalidArgument

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class Target:
    """A parsed ``"<backend>:<dtype>"``; ``"fp32"``/``"fp64"`` alone mean the eager reference."""

    backend: str
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.backend}:{dtype_name(self.dtype)}"

    @property
    def is_reference(self) -> bool:
        return self.backend == "eager" and self.dtype in (torch.float32, torch.float64)


class Backend(abc.ABC):
    """How one backend runs a module in a dtype.

    ``cast_weights`` says whether the module handed to :meth:`wrap` has its weights and inputs
    cast to the dtype (eager, strict, inductor, tensorrt) or stays FP32 (autocast).
    """

    name: ClassVar[str]
    cast_weights: ClassVar[bool] = True
    compiles: ClassVar[bool] = False  # True where wrap() is expensive (a compiler runs)
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` here, or None when it can."""
        return None

    @abc.abstractmethod
    def wrap(
        self, module: nn.Module, dtype: torch.dtype, args: tuple, kwargs: dict[str, Any]
    ) -> Callable[..., Any]:
        """Return a callable running ``module`` (a private copy, already plan-applied and cast
        when ``cast_weights``) under this backend. ``args``/``kwargs`` are example inputs, already
        in the dtype the callable will receive."""


def model_device(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> torch.device:
    """The device of the model's first parameter or buffer, else of the first input tensor, else CPU."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    for t in (*args, *(kwargs or {}).values()):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def check_dtype(backend: Backend, dtype: torch.dtype, spec: str) -> None:
    if dtype not in backend.dtypes:
        valid = ", ".join(dtype_name(d) for d in backend.dtypes)
        raise InvalidArgument(f"target {spec!r}: backend {backend.name!r} does not run {dtype_name(dtype)}; valid dtypes: {valid}")
