"""Tensor subclasses (DTensor, AsyncCollectiveTensor) as plain tensors of this rank's values.

The one place that looks inside tensor subclasses, so statistics and metrics never call
``.numpy()`` or ``.tolist()`` on one (NumPy refuses them). Cross-rank merging lives in
:mod:`torchprobe.distributed`.

    >>> local, layout = local_view(torch.ones(3))   # a plain tensor is its own local view
    >>> layout is None
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 - no distributed build: no DTensor can exist
        return None
    return DTensor


@dataclass(frozen=True)
class Layout:
    """Where a DTensor's local values sit: its mesh and placements (Partial already reduced)."""

    mesh: Any
    placements: tuple


def local_view(x: Tensor) -> tuple[Tensor, Layout | None]:
    """A plain tensor holding this rank's values of ``x``, and the DTensor layout (None for a
    plain tensor). A Partial DTensor is reduced first (a collective: every rank of its mesh
    must get here); an AsyncCollectiveTensor is waited on; the result is never a subclass that
    NumPy refuses."""
    DTensor = dtensor_type()
    with torch.no_grad():
        x = x.detach()
        layout = None
        if DTensor is not None and isinstance(x, DTensor):
            placements = tuple(x.placements)
            if any(p.is_partial() for p in placements):
                from torch.distributed.tensor import Replicate

                placements = tuple(Replicate() if p.is_partial() else p for p in placements)
                x = x.redistribute(x.device_mesh, placements)
            layout = Layout(x.device_mesh, placements)
            x = x.to_local()
        wait = getattr(x, "wait", None)
        if type(x) is not Tensor and callable(wait) and hasattr(x, "elem"):  # AsyncCollectiveTensor
            x = wait()
        return x, layout


def local_pair(ref: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's values of a (reference, test) pair, laid out alike, as plain tensors: a test
    DTensor is redistributed to the reference's placements; a DTensor paired with a plain tensor
    is gathered whole (``full_tensor()``, a collective)."""
    DTensor = dtensor_type()
    r_is, t_is = (DTensor is not None and isinstance(ref, DTensor)), (DTensor is not None and isinstance(test, DTensor))
    with torch.no_grad():
        if r_is and t_is:
            ref, layout = local_view(ref)
            test = test.detach()
            if tuple(test.placements) != layout.placements or test.device_mesh != layout.mesh:
                test = test.redistribute(layout.mesh, layout.placements)
            return ref, local_view(test)[0]
        if r_is:
            ref = ref.detach().full_tensor()
        if t_is:
            test = test.detach().full_tensor()
        return local_view(ref)[0], local_view(test)[0]


