"""``eager``: the module cast to the dtype, run by PyTorch as it is."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import Backend


class EagerBackend(Backend):
    name = "eager"
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def wrap(self, module: nn.Module, dtype: torch.dtype, args: tuple, kwargs: dict[str, Any]) -> Callable[..., Any]:
        return module
