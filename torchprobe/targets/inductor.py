"""``inductor``: ``torch.compile`` of the dtype-cast module, with real operator fusion.

Each module copy is compiled on its own. Dynamo's recompile limit (8 per code object by default)
would silently fall back to eager once many instances of one class (12 LayerNorms) are compiled,
so the limits are raised while torchprobe's compiled callables run.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .base import Backend

_RECOMPILE_LIMIT = 4096


class InductorBackend(Backend):
    name = "inductor"
    compiles = True

    def wrap(self, module: nn.Module, dtype: torch.dtype, args: tuple, kwargs: dict[str, Any]) -> Callable[..., Any]:
        compiled = torch.compile(module, backend="inductor", dynamic=False)

        def run(*a: Any, **k: Any) -> Any:
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=_RECOMPILE_LIMIT):
                return compiled(*a, **k)

        return run
