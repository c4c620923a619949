"""Text of :class:`~torchprobe.localize.margin.Margins`: weakest modules first (formatting only)."""
from __future__ import annotations

import math

from tabulate import tabulate

from .text import num

MAX_ROWS = 25
_EVIDENCE_WIDTH = 70


def factor_text(factor: float) -> str:
    """``x1.16``; ``never`` for a module that did not break."""
    return "never" if math.isinf(factor) else f"x{factor:.3g}"


def margins_text(mg: "Margins", max_rows: int = MAX_ROWS) -> str:
    head = (f"margin under {mg.target}: {len(mg.rows)} modules, local {mg.metric} above {num(mg.tol)} or new Inf/NaN, "
            f"up to x{mg.max_factor:g} (within 5 %)")
    if not mg.rows:
        lines = [head, "no module with a floating activation input was measured"]
    else:
        rows = []
        for m in mg.rows[:max_rows]:
            evidence = m.evidence if len(m.evidence) <= _EVIDENCE_WIDTH else m.evidence[: _EVIDENCE_WIDTH - 3] + "..."
            rows.append([m.module, m.module_type, factor_text(m.factor), "" if m.reason is None else str(m.reason),
                         "" if m.error is None else num(m.error), evidence])
        lines = [head, tabulate(rows, headers=["module", "type", "factor", "reason", mg.metric, "evidence"],
                                disable_numparse=True, colalign=("left", "left", "right", "left", "right", "left"))]
        rest = mg.rows[max_rows:]
        if rest:
            never = sum(1 for m in rest if not m.breaks)
            lines.append(f"... {len(rest)} more ({never} never break up to x{mg.max_factor:g})")
        w = mg.weakest
        if w.breaks:
            lines.append(f"weakest: {w.module} breaks at {factor_text(w.factor)} ({w.reason}) under {mg.target}")
        else:
            lines.append(f"no module breaks up to x{mg.max_factor:g} under {mg.target}")
    if mg.skipped:
        shown = ", ".join(f"{s.module} ({s.why})" for s in mg.skipped[:4])
        more = f" ... {len(mg.skipped) - 4} more" if len(mg.skipped) > 4 else ""
        lines.append(f"not measured ({len(mg.skipped)}): {shown}{more}")
    return "\n".join(lines)
