"""Text of a :class:`~torchprobe.monitor.MonitorHistory` (formatting only)."""
from __future__ import annotations


from tabulate import tabulate

from .margin import factor_text

TABLE_ROWS = 10


def monitor_text(hist: "MonitorHistory", max_rows: int = TABLE_ROWS) -> str:
    """Least headroom first: one row per module at its latest sample; then the margins."""
    ranked = hist.least_headroom()
    unit = "step" if hist.every == 1 else "steps"
    head = (f"Monitor: {len(hist)} modules, {len(hist.steps)} samples (every {hist.every} {unit}), "
            f"warn below {hist.headroom_bits:g} bits of FP16 headroom")
    if not ranked:
        return head + "\n(no samples yet: call step() before each forward pass)"
    headers = ["module", "step", "absmax", "headroom (bits)", "trend (bits/sample)", "NaN/Inf"]
    if hist.grads:
        headers += ["grad absmax", "grad < 2^-24", "grad zeros"]
    rows = []
    for m in ranked[:max_rows]:
        last = m.samples[-1]
        slope = m.trend(hist.trend_window)
        row = [m.module, last.step, f"{last.absmax:.4g}", f"{last.headroom_bits:.2f}",
               "" if slope is None else f"{round(slope * hist.every, 2) + 0.0:.2f}", last.nonfinite]
        if hist.grads:
            g = last.grad
            row += ["", "", ""] if g is None else [f"{g.absmax:.3g}", f"{g.tiny_fraction:.1%}", f"{g.zero_fraction:.1%}"]
        rows.append(row)
    more = len(ranked) - max_rows
    tail = f"\n... {more} more modules with more headroom" if more > 0 else ""
    text = head + "\n" + tabulate(rows, headers=headers, disable_numparse=True,
                                  colalign=("left",) + ("right",) * (len(headers) - 1)) + tail
    margins = hist.least_margin()
    if hist.target is None or not margins:
        return text
    spacing = hist.every * (hist.margin_every or 1)
    rows = []
    for m in margins[:max_rows]:
        slope = m.trend(hist.trend_window)
        rows.append([m.module, m.last.step, factor_text(m.last.factor), m.last.reason or "",
                     "" if slope is None else f"{2 ** (slope * spacing):.3g}x"])
    sample_unit = "sample" if hist.margin_every == 1 else f"{hist.margin_every} samples"
    return (text + f"\n\nMargin under {hist.target} (every {sample_unit}), warn below x{hist.min_margin:g}\n"
            + tabulate(rows, headers=["module", "step", "factor", "reason", "trend (per margin sample)"],
                       disable_numparse=True, colalign=("left", "right", "right", "left", "right")))
