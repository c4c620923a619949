"""Error types. Messages name the argument, what was expected, what came, and the next step."""
from __future__ import annotations


class TorchprobeError(Exception):
    """Base class of every error torchprobe raises on purpose."""


class InvalidArgument(TorchprobeError, ValueError):
    """An argument has a value torchprobe cannot use."""


class UnsupportedTarget(TorchprobeError):
    """A target (backend:dtype) cannot run here: missing package, device or dtype support."""


class DumpError(TorchprobeError):
    """A dump file is missing, corrupted, or not a torchprobe dump."""


class NonFiniteReference(TorchprobeError):
    """The FP32/FP64 reference itself holds NaN/Inf: nothing can be judged or verified against it."""
