"""torchprobe: where, and why, a PyTorch model's numerics go wrong in lower precision.

    import torchprobe as tp
    rep = tp.report(model, x, targets=("autocast:fp16", "eager:fp16", "strict:fp16"))
    print(rep); rep.culprits
    fix = tp.bisect(model, x, target="strict:fp16", tol=1e-2); print(fix.snippet())
"""
from __future__ import annotations

__version__ = "0.1.0"

from .capture import Recording, Row, record
from .dumps import Dump, DumpComparison, compare, dump, load_dump, save_dump
from .errors import DumpError, InvalidArgument, TorchprobeError, UnsupportedTarget
from .findings import Culprit, Report
from .localize import report
from .explain import Explanation, explain
from .metrics import ErrorMetrics, measure
from .search import Fix, Isolation, bisect, isolate
from .weights import WeightReport, check_weights
from .monitor import HeadroomTrendWarning, HeadroomWarning, LowHeadroomWarning, Monitor, MonitorHistory
from . import targets
from .stats import TensorStats
from .targets import PrecisionPlan, Target, parse_target

__all__ = [
    "record", "Recording", "Row", "TensorStats",
    "report", "Report", "Culprit",
    "explain", "Explanation",
    "isolate", "Isolation", "bisect", "Fix",
    "check_weights", "WeightReport",
    "Monitor", "MonitorHistory", "HeadroomWarning", "LowHeadroomWarning", "HeadroomTrendWarning",
    "dump", "compare", "load_dump", "save_dump", "Dump", "DumpComparison",
    "measure", "ErrorMetrics",
    "PrecisionPlan", "Target", "parse_target", "targets",
    "TorchprobeError", "InvalidArgument", "UnsupportedTarget", "DumpError",
    "__version__",
]
