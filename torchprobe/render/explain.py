"""Text for :class:`~torchprobe.explain.Explanation`: one table per module, risks first in the summary."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tabulate import tabulate

if TYPE_CHECKING:
    from ..explain import ExplainedOp, Explanation


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"


def _verdict(op: "ExplainedOp") -> str:
    if op.risk:
        return ("GIVES " if op.risk.startswith("-inf") else "MAY OVERFLOW: ") + op.risk
    return op.note or "ok"


def _value(op: "ExplainedOp") -> str:
    if op.peak is not None and op.peak_what and op.peak_what != "output":
        return f"{op.peak_what} {_num(op.peak)}"
    return _num(op.absmax)


def explain_text(ex: "Explanation", shape_ops: bool = False) -> str:
    """The explanation as text; ``shape_ops=True`` also lists ops without arithmetic."""
    ops = [o for o in ex.ops if o.arithmetic or shape_ops]
    hidden = sum(1 for o in ex.ops if not o.arithmetic) if not shape_ops else 0
    low = ex.target.split(":")[-1]
    n_low = sum(1 for o in ex.ops if o.arithmetic and o.rule != "cast" and o.dtype == low)
    n_fp32 = sum(1 for o in ex.ops if o.arithmetic and o.rule != "cast" and o.dtype == "fp32")
    lines = [f"explain {ex.target}: {ex.profile}",
             f"{ex.model}: {len(ops)} ops reach the engine: {n_low} in {low}, {n_fp32} in fp32, "
             f"{len(ex.risks)} may overflow" + (f" ({hidden} shape ops not listed)" if hidden else "")]
    for op in ex.risks:
        lines.append(f"  ! {op.module} {op.op}: {op.risk}")
    if ex.unknown:
        lines.append("  ops without a rule (run as PyTorch runs them): " + ", ".join(sorted({o.op for o in ex.unknown})))
    headers = ["module", "op", "dtype", "rule", "computed as", "FP32 value", "verdict"]
    types = dict(ex.module_types)
    rows, last = [], None
    for o in ops:
        where = "" if o.module == last else f"{o.module} ({types.get(o.module, '')})"
        last = o.module
        rows.append([where, o.op.replace("aten.", "").replace(".default", ""), o.dtype, o.rule or "-", o.computed,
                     _value(o), _verdict(o)])
    lines.append("")
    lines.append(tabulate(rows, headers=headers, disable_numparse=True))
    return "\n".join(lines)
