"""``autocast``: ``torch.autocast(device, dtype)`` around the FP32 module."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import Backend, model_device


class AutocastBackend(Backend):
    name = "autocast"
    cast_weights = False
    dtypes = (torch.float16, torch.bfloat16)

    def wrap(self, module: nn.Module, dtype: torch.dtype, args: tuple, kwargs: dict[str, Any]) -> Callable[..., Any]:
        device = model_device(module, args, kwargs).type

        def run(*a: Any, **k: Any) -> Any:
            with torch.autocast(device, dtype=dtype):
                return module(*a, **k)

        return run
