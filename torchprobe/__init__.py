"""torchprobe: where, and why, a PyTorch model's numerics go wrong in lower precision.

    import torchprobe as tp
    rep = tp.report(model, x, targets=("autocast:fp16", "eager:fp16", "strict:fp16"))
    print(rep); rep.culprits; rep.latent
    fix = tp.bisect(model, x, target="strict:fp16", tol=1e-2); print(fix.snippet())
    mg = tp.margin(model, x, target="strict:fp16"); mg.weakest.module, mg.weakest.factor
"""
from __future__ import annotations

__version__ = "0.2.0"

from .capture import Recording, Row, dump, record
from .compare import DumpComparison, compare
from .io.dumps import Dump, load_dump, save_dump
from .errors import DumpError, InvalidArgument, NonFiniteReference, TorchprobeError, UnsupportedTarget
from .io.onnx import export_onnx, onnx_names
from .kinds import ErrorKind, Reason, Risk
from .localize import report
from .explain import Explanation, explain
from .metrics import ErrorMetrics, Metric, get_metric, measure
from .results import Culprit, Fix, Isolation, Report
from .search import bisect, isolate
from .localize.margin import Margin, Margins, margin
from .weights import WeightReport, check_weights
from .monitor import (HeadroomTrendWarning, HeadroomWarning, LowHeadroomWarning, LowMarginWarning, MarginTrendWarning,
                      MarginWarning, Monitor, MonitorHistory)
from . import distributed, targets
from .stats import TensorStats
from .targets import PrecisionPlan, Target, parse_target
from .targets.plan import keep_fp32

__all__ = [
    "record", "Recording", "Row", "TensorStats",
    "report", "Report", "Culprit",
    "explain", "Explanation",
    "isolate", "Isolation", "bisect", "Fix",
    "margin", "Margins", "Margin",
    "check_weights", "WeightReport",
    "Monitor", "MonitorHistory", "HeadroomWarning", "LowHeadroomWarning", "HeadroomTrendWarning",
    "MarginWarning", "LowMarginWarning", "MarginTrendWarning",
    "dump", "compare", "load_dump", "save_dump", "Dump", "DumpComparison",
    "export_onnx", "onnx_names",
    "measure", "ErrorMetrics", "Metric", "get_metric",
    "ErrorKind", "Reason", "Risk",
    "PrecisionPlan", "Target", "parse_target", "targets", "keep_fp32", "distributed",
    "TorchprobeError", "InvalidArgument", "UnsupportedTarget", "DumpError", "NonFiniteReference",
    "__version__",
]
